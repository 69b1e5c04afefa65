//! Callbacks at the gateway: a job's callback is checked against the
//! operator's policy before the job reaches Kafka (a refused destination
//! is never attempted), and a tenant reads the secret its deliveries are
//! signed with.

use std::collections::BTreeSet;

use axum::Json;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::HeaderMap;
use serde::{Deserialize, Serialize};
use sluice_schemas::{ErrorCode, JobRequest, callback};

use super::openapi::{E401, E403, E422, E501};
use super::{ApiError, Gateway};

impl Gateway {
    /// Every distinct callback URL of `jobs` (their batch's too), checked
    /// (resolved, for a name) against `callbacks.allow_hosts` and
    /// `callbacks.allow_networks`.
    pub(super) async fn check_callbacks(&self, jobs: &[JobRequest]) -> Result<(), ApiError> {
        let urls: BTreeSet<&str> = jobs
            .iter()
            .filter_map(|j| j.callback.as_ref())
            .map(|c| c.url.as_str())
            .chain(jobs.iter().filter_map(|j| j.batch.as_ref()?.callback_url.as_deref()))
            .collect();
        if urls.is_empty() {
            return Ok(());
        }
        let policy = self.cfg.callbacks.as_ref().map_err(|why| ApiError::CallbackRefused {
            url: urls.first().map(|u| u.to_string()).unwrap_or_default(),
            why: why.to_string(),
        })?;
        for url in urls {
            policy
                .check(url)
                .await
                .map_err(|e| ApiError::CallbackRefused { url: url.to_owned(), why: e.to_string() })?;
        }
        Ok(())
    }
}

/// The query of `GET /v1/callbacks/secret`.
#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub(super) struct SecretQuery {
    /// Whose secret. Open mode only (default `gateway.default_tenant`);
    /// with an API key it may only name the key's tenant.
    #[param(pattern = r"^[A-Za-z0-9._-]{1,64}$")]
    tenant: Option<String>,
}

/// A tenant's callback signing secret.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(super) struct Secret {
    tenant: String,
    /// `whsec_...`: the HMAC-SHA256 key (these bytes, as they are) of the
    /// `Sluice-Signature` header of this tenant's deliveries.
    secret: String,
    /// How a delivery is signed.
    scheme: &'static str,
}

/// `GET /v1/callbacks/secret`: the secret the caller's callback deliveries
/// are signed with, to verify them (see README, "Callbacks").
#[utoipa::path(
    get,
    path = "/v1/callbacks/secret",
    tag = "callbacks",
    operation_id = "callbackSecret",
    summary = "The secret your callbacks are signed with",
    params(SecretQuery),
    responses(
        (status = 200, body = Secret, description = "The tenant's secret"),
        (status = 401, response = E401),
        (status = 403, response = E403),
        (status = 422, response = E422),
        (status = 501, response = E501),
    ),
)]
pub(super) async fn secret(
    State(gw): State<Gateway>,
    headers: HeaderMap,
    query: Result<Query<SecretQuery>, QueryRejection>,
) -> Result<Json<Secret>, ApiError> {
    let caller = gw.keys.authenticate(&headers)?;
    let Query(q) = query.map_err(|e| ApiError::Invalid {
        code: ErrorCode::SchemaViolation,
        message: format!("query: {}", e.body_text()),
    })?;
    let tenant = caller.acting_for(q.tenant, &gw.cfg.default_tenant)?;
    if gw.cfg.callback_signing_key.is_empty() {
        return Err(ApiError::CallbacksNotConfigured);
    }
    Ok(Json(Secret {
        secret: callback::tenant_secret(&gw.cfg.callback_signing_key, &tenant),
        tenant,
        scheme: "Sluice-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, \"<t>.<raw body>\")>",
    }))
}
