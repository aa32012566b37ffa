//! Error answers and JSON bodies: every non-2xx answer is a JSON [`ErrorBody`].

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{FromRequest, Request};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use keyward_common::api::ErrorBody;
use serde::de::DeserializeOwned;

use crate::service::{ErrorKind, ServiceError};

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

impl<S, T> FromRequest<S> for ApiJson<T>
where
    S: Send + Sync,
    T: DeserializeOwned,
{
    type Rejection = ServiceError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = Bytes::from_request(req, state).await.map_err(body_error)?;
        serde_json::from_slice(&bytes)
            .map(ApiJson)
            .map_err(|e| ServiceError::bad_request(format!("invalid JSON body: {e}")))
    }
}

fn body_error(rejection: BytesRejection) -> ServiceError {
    if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
        ServiceError::new(
            ErrorKind::TooLarge,
            "too_large",
            "request body is larger than the server accepts",
        )
    } else {
        ServiceError::bad_request(format!(
            "request body could not be read: {}",
            rejection.body_text()
        ))
    }
}

/// The 404 answer for unknown paths.
pub async fn no_route() -> ServiceError {
    ServiceError::not_found("no such endpoint; see the API list in README.md")
}
