//! Error answers and JSON bodies: every non-2xx answer is a JSON [`ErrorBody`].

use std::sync::Arc;

use axum::extract::{FromRequest, Request};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use http_body_util::BodyExt as _;
use keyward_common::api::ErrorBody;
use serde::de::DeserializeOwned;

use crate::service::{ErrorKind, Service, ServiceError};

/// How much of an oversized body is read and thrown away before answering 413. Reading it lets
/// the client receive the answer: closing a socket with unread data makes the kernel reset the
/// connection, and the client would see a reset instead of the 413.
const DRAIN_LIMIT: usize = 16 * 1024 * 1024;

impl IntoResponse for ServiceError {
    fn into_response(self) -> Response {
        let status = match self.kind {
            ErrorKind::BadRequest => StatusCode::BAD_REQUEST,
            ErrorKind::Unauthorized => StatusCode::UNAUTHORIZED,
            ErrorKind::Forbidden => StatusCode::FORBIDDEN,
            ErrorKind::NotFound => StatusCode::NOT_FOUND,
            ErrorKind::Conflict => StatusCode::CONFLICT,
            ErrorKind::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ErrorKind::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        let body = ErrorBody {
            code: self.code.to_string(),
            message: self.message,
        };
        (status, axum::Json(body)).into_response()
    }
}

/// A JSON request body, parsed with the target type's rules (unknown and duplicate fields
/// refused), with errors answered as [`ErrorBody`].
#[derive(Debug)]
pub struct ApiJson<T>(pub T);

impl<T> FromRequest<Arc<Service>> for ApiJson<T>
where
    T: DeserializeOwned,
{
    type Rejection = ServiceError;

    async fn from_request(req: Request, service: &Arc<Service>) -> Result<Self, Self::Rejection> {
        let limit = service.settings.max_body_bytes;
        let mut body = req.into_body();
        // Bodies can carry secret files; the buffer is zeroized when dropped.
        let mut bytes = zeroize::Zeroizing::new(Vec::new());
        let mut total = 0usize;
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| {
                ServiceError::bad_request(format!("request body could not be read: {e}"))
            })?;
            let Ok(data) = frame.into_data() else {
                continue;
            };
            total += data.len();
            if total <= limit {
                bytes.extend_from_slice(&data);
            } else if total > limit + DRAIN_LIMIT {
                break;
            }
        }
        if total > limit {
            return Err(ServiceError::new(
                ErrorKind::TooLarge,
                "too_large",
                format!("request body is larger than the server accepts ({limit} bytes)"),
            ));
        }
        serde_json::from_slice(&bytes)
            .map(ApiJson)
            .map_err(|e| ServiceError::bad_request(format!("invalid JSON body: {e}")))
    }
}

/// The 404 answer for unknown paths.
pub async fn no_route() -> ServiceError {
    ServiceError::not_found("no such endpoint; see the API list in README.md")
}
