//! The HTTP routes and their handlers. Handlers only translate between HTTP and
//! [`Service`](crate::service::Service) calls.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Json;
use axum::Router;
use axum::extract::{DefaultBodyLimit, Path, Query, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use keyward_common::api::{
    CertificateResponse, EnrollRequest, RenewRequest, StatusReport, WatchResponse,
};
use serde::Deserialize;

use super::auth::{NodeCaller, OperatorCaller};
use super::error::{ApiJson, no_route};
use crate::api::{
    AccessKeyResponse, AddMemberRequest, AddUserKeyRequest, AuditPage, ChangeOutcome,
    ContainerView, CreateContainerRequest, CreateGroupRequest, CreateTokenRequest,
    CreateUserRequest, GroupView, KeyView, NodeView, RolloutOverrides, RolloutView, TokenResponse,
    UserView,
};
use crate::service::{Service, ServiceError, ServiceResult};

type AppState = State<Arc<Service>>;

/// Routes of the enrollment listener: enrollment and health only.
pub fn enroll_router(service: Arc<Service>) -> Router {
    let limit = service.settings.max_body_bytes;
    Router::new()
        .route("/v1/enroll", post(enroll))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .fallback(no_route)
        .layer(DefaultBodyLimit::max(limit))
        .layer(middleware::from_fn_with_state(service.clone(), access_log))
        .with_state(service)
}

/// Routes of the mTLS API listener.
pub fn api_router(service: Arc<Service>) -> Router {
    let limit = service.settings.max_body_bytes;
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        // Node endpoints.
        .route("/v1/node/renew", post(renew))
        .route("/v1/node/watch", get(watch))
        .route(
            "/v1/node/files/{container}/{generation}/{idx}",
            get(fetch_file),
        )
        .route("/v1/node/status", post(report_status))
        // Operator endpoints.
        .route("/v1/nodes", get(list_nodes))
        .route("/v1/nodes/tokens", post(create_token))
        .route("/v1/nodes/{id}", get(show_node))
        .route("/v1/nodes/{id}/evict", post(evict_node))
        .route("/v1/users", get(list_users).post(create_user))
        .route("/v1/users/{name}", get(show_user).delete(remove_user))
        .route("/v1/users/{name}/keys", post(add_user_key))
        .route("/v1/groups", get(list_groups).post(create_group))
        .route("/v1/groups/{name}", delete(remove_group))
        .route("/v1/groups/{name}/members", post(add_member))
        .route("/v1/groups/{name}/members/{user}", delete(remove_member))
        .route(
            "/v1/containers",
            get(list_containers).post(create_container),
        )
        .route("/v1/containers/{id}", get(show_container))
        .route("/v1/containers/{id}/rotate", post(rotate_container))
        .route("/v1/containers/{id}/destroy", post(destroy_container))
        .route("/v1/keys", get(list_keys))
        .route("/v1/keys/{id}", get(show_key))
        .route("/v1/keys/{id}/revoke", post(revoke_key))
        .route("/v1/rollouts", get(list_rollouts))
        .route("/v1/rollouts/{id}", get(show_rollout))
        .route("/v1/rollouts/{id}/resume", post(resume_rollout))
        .route("/v1/audit", get(audit))
        .fallback(no_route)
        .layer(DefaultBodyLimit::max(limit))
        .layer(middleware::from_fn_with_state(service.clone(), access_log))
        .with_state(service)
}

/// Logs every request at debug level (never bodies) and counts answers by status class.
async fn access_log(State(service): AppState, req: Request, next: Next) -> Response {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let started = Instant::now();
    let response = next.run(req).await;
    let status = response.status().as_u16();
    service.metrics.count_status(status);
    tracing::debug!(
        %method,
        %path,
        status,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "request",
    );
    response
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(service): AppState) -> Response {
    if service.store.ping().await {
        "ready\n".into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "database unreachable\n").into_response()
    }
}

async fn metrics(State(service): AppState, _op: OperatorCaller) -> ServiceResult<Response> {
    let revision = service.store.revision().await?;
    Ok((
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        service.metrics.render(revision),
    )
        .into_response())
}

async fn enroll(
    State(service): AppState,
    ApiJson(req): ApiJson<EnrollRequest>,
) -> ServiceResult<Json<CertificateResponse>> {
    service.enroll(req).await.map(Json)
}

async fn renew(
    State(service): AppState,
    node: NodeCaller,
    ApiJson(req): ApiJson<RenewRequest>,
) -> ServiceResult<Json<CertificateResponse>> {
    service.renew(&node.id, &node.cert, req).await.map(Json)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct WatchQuery {
    #[serde(default)]
    since: u64,
    /// Seconds to wait; the server caps it.
    #[serde(default)]
    wait: Option<u64>,
}

async fn watch(
    State(service): AppState,
    node: NodeCaller,
    query: Result<Query<WatchQuery>, axum::extract::rejection::QueryRejection>,
) -> ServiceResult<Json<WatchResponse>> {
    let Query(query) = query.map_err(|e| ServiceError::bad_request(e.body_text()))?;
    let wait = Duration::from_secs(query.wait.unwrap_or(u64::MAX));
    service.watch(&node.id, query.since, wait).await.map(Json)
}

async fn fetch_file(
    State(service): AppState,
    node: NodeCaller,
    Path((container, generation, idx)): Path<(String, u64, usize)>,
) -> ServiceResult<Response> {
    let content = service
        .fetch_file(&node.id, &container, generation, idx)
        .await?;
    // The body owns the secret and zeroizes it once sent.
    let body = axum::body::Body::from(axum::body::Bytes::from_owner(content));
    Ok(([(header::CONTENT_TYPE, "application/octet-stream")], body).into_response())
}

async fn report_status(
    State(service): AppState,
    node: NodeCaller,
    ApiJson(report): ApiJson<StatusReport>,
) -> ServiceResult<StatusCode> {
    service
        .report_status(&node.id, report)
        .await
        .map(|()| StatusCode::NO_CONTENT)
}

async fn create_token(
    State(service): AppState,
    op: OperatorCaller,
    ApiJson(req): ApiJson<CreateTokenRequest>,
) -> ServiceResult<(StatusCode, Json<TokenResponse>)> {
    service
        .create_token(&op.actor(), req)
        .await
        .map(|t| (StatusCode::CREATED, Json(t)))
}

async fn list_nodes(
    State(service): AppState,
    _op: OperatorCaller,
) -> ServiceResult<Json<Vec<NodeView>>> {
    service.list_nodes().await.map(Json)
}

async fn show_node(
    State(service): AppState,
    _op: OperatorCaller,
    Path(id): Path<String>,
) -> ServiceResult<Json<NodeView>> {
    service.show_node(&id).await.map(Json)
}

async fn evict_node(
    State(service): AppState,
    op: OperatorCaller,
    Path(id): Path<String>,
) -> ServiceResult<Json<NodeView>> {
    service.evict_node(&op.actor(), &id).await.map(Json)
}

type PolicyParams = Result<Query<RolloutOverrides>, axum::extract::rejection::QueryRejection>;

fn policy(params: PolicyParams) -> ServiceResult<RolloutOverrides> {
    params
        .map(|Query(q)| q)
        .map_err(|e| ServiceError::bad_request(e.body_text()))
}

async fn create_user(
    State(service): AppState,
    op: OperatorCaller,
    ApiJson(req): ApiJson<CreateUserRequest>,
) -> ServiceResult<(StatusCode, Json<ChangeOutcome>)> {
    service
        .create_user(&op.actor(), req)
        .await
        .map(|o| (StatusCode::CREATED, Json(o)))
}

async fn list_users(
    State(service): AppState,
    _op: OperatorCaller,
) -> ServiceResult<Json<Vec<UserView>>> {
    service.list_users().await.map(Json)
}

async fn show_user(
    State(service): AppState,
    _op: OperatorCaller,
    Path(name): Path<String>,
) -> ServiceResult<Json<UserView>> {
    service.show_user(&name).await.map(Json)
}

async fn remove_user(
    State(service): AppState,
    op: OperatorCaller,
    Path(name): Path<String>,
    params: PolicyParams,
) -> ServiceResult<Json<ChangeOutcome>> {
    let policy = policy(params)?;
    service
        .remove_user(&op.actor(), &name, policy)
        .await
        .map(Json)
}

async fn add_user_key(
    State(service): AppState,
    op: OperatorCaller,
    Path(name): Path<String>,
    ApiJson(req): ApiJson<AddUserKeyRequest>,
) -> ServiceResult<(StatusCode, Json<ChangeOutcome>)> {
    service
        .add_user_key(&op.actor(), &name, req)
        .await
        .map(|o| (StatusCode::CREATED, Json(o)))
}

async fn create_group(
    State(service): AppState,
    op: OperatorCaller,
    ApiJson(req): ApiJson<CreateGroupRequest>,
) -> ServiceResult<(StatusCode, Json<GroupView>)> {
    service
        .create_group(&op.actor(), req)
        .await
        .map(|g| (StatusCode::CREATED, Json(g)))
}

async fn list_groups(
    State(service): AppState,
    _op: OperatorCaller,
) -> ServiceResult<Json<Vec<GroupView>>> {
    service.list_groups().await.map(Json)
}

async fn remove_group(
    State(service): AppState,
    op: OperatorCaller,
    Path(name): Path<String>,
    params: PolicyParams,
) -> ServiceResult<Json<ChangeOutcome>> {
    let policy = policy(params)?;
    service
        .remove_group(&op.actor(), &name, policy)
        .await
        .map(Json)
}

async fn add_member(
    State(service): AppState,
    op: OperatorCaller,
    Path(name): Path<String>,
    ApiJson(req): ApiJson<AddMemberRequest>,
) -> ServiceResult<(StatusCode, Json<ChangeOutcome>)> {
    service
        .add_member(&op.actor(), &name, req)
        .await
        .map(|o| (StatusCode::CREATED, Json(o)))
}

async fn remove_member(
    State(service): AppState,
    op: OperatorCaller,
    Path((name, user)): Path<(String, String)>,
    params: PolicyParams,
) -> ServiceResult<Json<ChangeOutcome>> {
    let policy = policy(params)?;
    service
        .remove_member(&op.actor(), &name, &user, policy)
        .await
        .map(Json)
}

async fn create_container(
    State(service): AppState,
    op: OperatorCaller,
    ApiJson(req): ApiJson<CreateContainerRequest>,
) -> ServiceResult<(StatusCode, Json<AccessKeyResponse>)> {
    service
        .create_container(&op.actor(), req)
        .await
        .map(|r| (StatusCode::CREATED, Json(r)))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ContainerQuery {
    node: Option<String>,
}

async fn list_containers(
    State(service): AppState,
    _op: OperatorCaller,
    query: Result<Query<ContainerQuery>, axum::extract::rejection::QueryRejection>,
) -> ServiceResult<Json<Vec<ContainerView>>> {
    let Query(query) = query.map_err(|e| ServiceError::bad_request(e.body_text()))?;
    service
        .list_containers(query.node.as_deref())
        .await
        .map(Json)
}

async fn show_container(
    State(service): AppState,
    _op: OperatorCaller,
    Path(id): Path<String>,
) -> ServiceResult<Json<ContainerView>> {
    service.show_container(&id).await.map(Json)
}

async fn rotate_container(
    State(service): AppState,
    op: OperatorCaller,
    Path(id): Path<String>,
) -> ServiceResult<Json<AccessKeyResponse>> {
    service.rotate_container(&op.actor(), &id).await.map(Json)
}

async fn destroy_container(
    State(service): AppState,
    op: OperatorCaller,
    Path(id): Path<String>,
) -> ServiceResult<Json<ContainerView>> {
    service.destroy_container(&op.actor(), &id).await.map(Json)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyQuery {
    state: Option<String>,
}

async fn list_keys(
    State(service): AppState,
    _op: OperatorCaller,
    query: Result<Query<KeyQuery>, axum::extract::rejection::QueryRejection>,
) -> ServiceResult<Json<Vec<KeyView>>> {
    let Query(query) = query.map_err(|e| ServiceError::bad_request(e.body_text()))?;
    if let Some(state) = query.state.as_deref()
        && state != "active"
        && state != "revoked"
    {
        return Err(ServiceError::bad_request("state must be active or revoked"));
    }
    service.list_keys(query.state.as_deref()).await.map(Json)
}

async fn show_key(
    State(service): AppState,
    _op: OperatorCaller,
    Path(id): Path<String>,
) -> ServiceResult<Json<KeyView>> {
    service.show_key(&id).await.map(Json)
}

async fn revoke_key(
    State(service): AppState,
    op: OperatorCaller,
    Path(id): Path<String>,
    params: PolicyParams,
) -> ServiceResult<Json<ChangeOutcome>> {
    let policy = policy(params)?;
    service.revoke_key(&op.actor(), &id, policy).await.map(Json)
}

async fn list_rollouts(
    State(service): AppState,
    _op: OperatorCaller,
) -> ServiceResult<Json<Vec<RolloutView>>> {
    service.list_rollouts().await.map(Json)
}

async fn show_rollout(
    State(service): AppState,
    _op: OperatorCaller,
    Path(id): Path<String>,
) -> ServiceResult<Json<RolloutView>> {
    service.show_rollout(&id).await.map(Json)
}

async fn resume_rollout(
    State(service): AppState,
    op: OperatorCaller,
    Path(id): Path<String>,
) -> ServiceResult<Json<RolloutView>> {
    service.resume_rollout(&op.actor(), &id).await.map(Json)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AuditQuery {
    #[serde(default)]
    after: u64,
    limit: Option<u64>,
}

async fn audit(
    State(service): AppState,
    _op: OperatorCaller,
    query: Result<Query<AuditQuery>, axum::extract::rejection::QueryRejection>,
) -> ServiceResult<Json<AuditPage>> {
    let Query(query) = query.map_err(|e| ServiceError::bad_request(e.body_text()))?;
    service
        .audit_page(query.after, query.limit.unwrap_or(1000))
        .await
        .map(Json)
}
