#!/bin/sh
# Entry point of keyward's image in docker-compose.yml. One argument picks the role:
#   server  initialize the data directory on first start, then serve
#   tokens  one shot: create a join token for each node in $KEYWARD_NODES into /tokens
#   agent   enroll on first start with the token from /tokens, then run
set -eu

case "${1:-}" in
server)
    if [ ! -f /data/config.toml ]; then
        keyward-server init --data /data --domain "${KEYWARD_DOMAIN:-compose.local}" \
            --san server --san localhost --san 127.0.0.1 \
            --listen 0.0.0.0:7443 --enroll-listen 0.0.0.0:7444 \
            --server-url https://server:7443 --enroll-url https://server:7444
    fi
    exec keyward-server serve --data /data
    ;;
tokens)
    # Wait for the server and its operator identity.
    tries=0
    until keyward --server https://server:7443 --identity /data/operator node list >/dev/null 2>&1; do
        tries=$((tries + 1))
        [ "$tries" -lt 120 ] || { echo "server did not come up" >&2; exit 1; }
        sleep 1
    done
    for node in ${KEYWARD_NODES}; do
        # Written atomically (temporary file, rename), so a token file is never half written.
        if [ -s "/tokens/$node.token" ]; then
            continue
        fi
        keyward --server https://server:7443 --identity /data/operator node token create "$node" \
            --fingerprint-out /tokens/ca-fingerprint --token-out "/tokens/$node.token"
    done
    ;;
agent)
    if [ ! -f /state/agent.json ]; then
        keyward-agent enroll --state /state --server https://server:7443 --enroll-url https://server:7444 \
            --node "${KEYWARD_NODE}" --ca-fingerprint-file /tokens/ca-fingerprint \
            --token-file "/tokens/${KEYWARD_NODE}.token" --wait-for-token 180
    fi
    exec keyward-agent run --state /state
    ;;
*)
    echo "usage: keyward-entrypoint server|tokens|agent" >&2
    exit 2
    ;;
esac
