//! OpenAI-style error responses: `{"error": {"message", "type", "param", "code"}}` with the
//! status code the API reference gives each kind, and the one place where engine and guest
//! failures are mapped to them.

use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::runtime::{GuestErrorKind, RuntimeError};

/// An error answered to the client.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    /// `invalid_request_error`, `authentication_error`, `rate_limit_error`, `server_error`, ...
    pub kind: &'static str,
    /// The request field at fault, if one is.
    pub param: Option<String>,
    pub code: Option<&'static str>,
    /// Seconds, for 429/503.
    pub retry_after: Option<u64>,
}

impl ApiError {
    /// 400: a request field is wrong.
    pub fn invalid(param: Option<String>, message: impl Into<String>) -> ApiError {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            kind: "invalid_request_error",
            param,
            code: None,
            retry_after: None,
        }
    }

    /// 400 for a field stllm does not support (yet), never ignored silently.
    pub fn unsupported(param: &str, message: impl Into<String>) -> ApiError {
        ApiError { code: Some("unsupported_parameter"), ..ApiError::invalid(Some(param.to_string()), message) }
    }

    pub fn not_found(message: impl Into<String>, code: &'static str) -> ApiError {
        ApiError {
            status: StatusCode::NOT_FOUND,
            message: message.into(),
            kind: "invalid_request_error",
            param: None,
            code: Some(code),
            retry_after: None,
        }
    }

    pub fn unauthorized() -> ApiError {
        ApiError {
            status: StatusCode::UNAUTHORIZED,
            message: "Incorrect or missing API key: pass it as `Authorization: Bearer KEY`".into(),
            kind: "authentication_error",
            param: None,
            code: Some("invalid_api_key"),
            retry_after: None,
        }
    }

    pub fn overloaded(waiting: usize) -> ApiError {
        ApiError {
            status: StatusCode::TOO_MANY_REQUESTS,
            message: format!("the server is at its limit ({waiting} requests waiting): retry later"),
            kind: "rate_limit_error",
            param: None,
            code: Some("rate_limit_exceeded"),
            retry_after: Some(1),
        }
    }

    pub fn shutting_down() -> ApiError {
        ApiError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            message: "the server is shutting down".into(),
            kind: "server_error",
            param: None,
            code: Some("shutting_down"),
            retry_after: Some(5),
        }
    }

    pub fn internal(message: impl Into<String>) -> ApiError {
        ApiError {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            message: message.into(),
            kind: "server_error",
            param: None,
            code: None,
            retry_after: None,
        }
    }

    /// A failed policy call, by kind: the request's fault (400), a full context (400, as OpenAI
    /// answers `context_length_exceeded`), or the guest's (500, this request only).
    /// `prompt_param` names the field that held the prompt (`messages`, `prompt`, `input`).
    pub fn from_runtime(e: RuntimeError, prompt_param: &str) -> ApiError {
        match e {
            RuntimeError::Guest { kind: GuestErrorKind::InvalidInput, msg } => ApiError::invalid(None, msg),
            RuntimeError::Guest { kind: GuestErrorKind::ContextFull, msg } => ApiError {
                code: Some("context_length_exceeded"),
                ..ApiError::invalid(
                    Some(prompt_param.to_string()),
                    format!("the prompt does not fit the context: {msg}"),
                )
            },
            RuntimeError::Cancelled => ApiError {
                status: StatusCode::from_u16(499).unwrap_or(StatusCode::BAD_REQUEST),
                ..ApiError::internal("the request was cancelled")
            },
            other @ (RuntimeError::Guest { kind: GuestErrorKind::Internal, .. }
            | RuntimeError::Timeout { .. }
            | RuntimeError::OutOfFuel { .. }
            | RuntimeError::OutOfMemory { .. }
            | RuntimeError::Trap { .. }
            | RuntimeError::Load { .. }
            | RuntimeError::Wasmtime(_)) => ApiError::internal(other.to_string()),
        }
    }

    pub fn body(&self) -> serde_json::Value {
        json!({"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (self.status, axum::Json(self.body())).into_response();
        if let Some(s) = self.retry_after {
            r.headers_mut().insert("retry-after", HeaderValue::from(s));
        }
        r
    }
}
