//! Operator requests that tests, benchmarks and the quick start share: an SSH container on a
//! port published on 127.0.0.1, a secret file, and waiting for what the agents report back.

use std::time::Duration;

use base64::Engine as _;
use keyward_common::client::ApiClient;
use keyward_common::manifest::{PortMapping, Protocol};
use keyward_common::secret::SecretString;
use keyward_server::api::{ContainerView, CreateContainerRequest, FileSpec, NodeView};

use crate::wait;

/// A container of `image` on `node` whose sshd (port 22) is published on `127.0.0.1:host_port`,
/// or published nowhere when `host_port` is `None`. No groups, files, command or environment;
/// callers set what their scenario needs.
pub fn ssh_container(
    node: &str,
    name: &str,
    image: &str,
    host_port: Option<u16>,
) -> CreateContainerRequest {
    CreateContainerRequest {
        node: node.into(),
        name: name.into(),
        image: image.into(),
        image_id: None,
        groups: vec![],
        command: vec![],
        env: vec![],
        ports: host_port
            .map(|host_port| PortMapping {
                container_port: 22,
                protocol: Protocol::Tcp,
                host_ip: [127, 0, 0, 1].into(),
                host_port,
            })
            .into_iter()
            .collect(),
        files: vec![],
    }
}

/// A file injected at `path` with mode 0400, owned by root.
pub fn secret_file(path: &str, content: impl AsRef<[u8]>) -> FileSpec {
    FileSpec {
        path: path.into(),
        mode: Some(0o400),
        uid: None,
        gid: None,
        content_base64: SecretString::new(
            base64::engine::general_purpose::STANDARD.encode(content),
        ),
    }
}

/// Waits until `node`'s agent has reported its image inventory, so the server can resolve
/// image names for it.
pub async fn wait_inventory(op: &ApiClient, node: &str) {
    wait::until(
        "the agent's image inventory",
        Duration::from_secs(60),
        || async {
            let view: NodeView = op.get_json(&format!("/v1/nodes/{node}")).await.ok()?;
            (!view.inventory.is_empty()).then_some(())
        },
    )
    .await;
}

/// Waits until container `id`'s view satisfies `done` (`what` names it in the timeout panic).
pub async fn wait_container(
    op: &ApiClient,
    id: &str,
    what: &str,
    timeout: Duration,
    done: impl Fn(&ContainerView) -> bool,
) -> ContainerView {
    wait::until(&format!("container {id}: {what}"), timeout, || async {
        let view: ContainerView = op.get_json(&format!("/v1/containers/{id}")).await.ok()?;
        done(&view).then_some(view)
    })
    .await
}

/// Asks the server to destroy container `id`; returns the view the request answered with.
pub async fn destroy(op: &ApiClient, id: &str) -> ContainerView {
    op.post_json(
        &format!("/v1/containers/{id}/destroy"),
        &serde_json::json!({}),
    )
    .await
    .unwrap_or_else(|e| panic!("destroying container {id}: {e}"))
}
