//! API keys → tenants.
//!
//! Keys are configured by their SHA-256 (`sluice hash-key` prints it), so the
//! configuration never holds a usable key; a request's key is hashed and
//! looked up. Keys are never logged. With no keys configured the gateway is
//! open: every caller may name any tenant and read any job (`sluice up`).

use std::collections::HashMap;

use axum::http::{HeaderMap, header};

use sha2::{Digest, Sha256};

use super::ApiError;
use crate::config::ApiKey;

/// Who is calling.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// The tenant of the API key, or `None` in open mode.
    pub tenant: Option<String>,
}

impl Caller {
    /// Whether this caller may see a job or batch of `tenant`.
    pub fn may_see(&self, tenant: &str) -> bool {
        self.tenant.as_deref().is_none_or(|t| t == tenant)
    }

    /// The tenant a request acts for: the API key's (a `tenant` the request
    /// names must be the same: 403 `tenant_mismatch` otherwise), or in open
    /// mode the one it names, else `default`. Job ids are per tenant, so
    /// this picks whose job `/v1/jobs/{id}` means.
    pub fn acting_for(&self, named: Option<String>, default: &str) -> Result<String, ApiError> {
        match (&self.tenant, named) {
            (Some(own), Some(named)) if *own != named => Err(ApiError::TenantMismatch { given: named }),
            (Some(own), _) => Ok(own.clone()),
            (None, Some(named)) if !sluice_schemas::valid_tenant(&named) => Err(ApiError::Invalid {
                code: sluice_schemas::ErrorCode::SchemaViolation,
                message: format!(
                    "tenant: {named:?} is not 1 to {} characters of A-Z a-z 0-9 . _ -",
                    sluice_schemas::limits::TENANT_CHARS
                ),
            }),
            (None, Some(named)) => Ok(named),
            (None, None) => Ok(default.to_owned()),
        }
    }
}

/// Hex SHA-256 of a key, as configured.
pub fn hash_key(key: &str) -> String {
    Sha256::digest(key.as_bytes()).iter().map(|b| format!("{b:02x}")).collect()
}

/// The configured keys.
#[derive(Debug, Default)]
pub struct ApiKeys {
    by_hash: HashMap<String, String>,
}

impl ApiKeys {
    pub fn new(keys: &[ApiKey]) -> ApiKeys {
        ApiKeys { by_hash: keys.iter().map(|k| (k.sha256.to_ascii_lowercase(), k.tenant.clone())).collect() }
    }

    /// Whether keys are required.
    pub fn enabled(&self) -> bool {
        !self.by_hash.is_empty()
    }

    /// The caller's tenant as a metric label: its key's tenant, `open`
    /// without keys, `unknown` for a missing or unknown key. Bounded by the
    /// configured tenants, whatever callers send.
    pub fn tenant_label(&self, headers: &HeaderMap) -> String {
        match self.authenticate(headers) {
            Ok(Caller { tenant: Some(t) }) => t,
            Ok(Caller { tenant: None }) => "open".to_owned(),
            Err(_) => "unknown".to_owned(),
        }
    }

    /// The caller of a request: its key's tenant, or open mode.
    pub fn authenticate(&self, headers: &HeaderMap) -> Result<Caller, ApiError> {
        if !self.enabled() {
            return Ok(Caller { tenant: None });
        }
        let key = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .or_else(|| headers.get("x-api-key").and_then(|v| v.to_str().ok()))
            .ok_or(ApiError::Unauthorized)?;
        let tenant = self.by_hash.get(&hash_key(key.trim())).ok_or(ApiError::Unauthorized)?;
        Ok(Caller { tenant: Some(tenant.clone()) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// acme's key is `s3cret`.
    fn acme() -> ApiKeys {
        ApiKeys::new(&[ApiKey {
            tenant: "acme".into(),
            sha256: hash_key("s3cret"),
            rate_per_second: None,
            rate_burst: None,
        }])
    }

    #[test]
    fn keys_map_to_tenants_and_open_mode_sees_everything() {
        let keys = acme();
        let mut h = HeaderMap::new();
        assert!(matches!(keys.authenticate(&h), Err(ApiError::Unauthorized)));
        h.insert(header::AUTHORIZATION, "Bearer wrong".parse().unwrap());
        assert!(matches!(keys.authenticate(&h), Err(ApiError::Unauthorized)));
        h.insert(header::AUTHORIZATION, "Bearer s3cret".parse().unwrap());
        let caller = keys.authenticate(&h).unwrap();
        assert_eq!(caller.tenant.as_deref(), Some("acme"));
        assert!(caller.may_see("acme") && !caller.may_see("other"));
        assert_eq!(caller.acting_for(None, "dflt").unwrap(), "acme");
        assert_eq!(caller.acting_for(Some("acme".into()), "dflt").unwrap(), "acme");
        assert!(matches!(caller.acting_for(Some("other".into()), "dflt"), Err(ApiError::TenantMismatch { .. })));
        let mut h = HeaderMap::new();
        h.insert("x-api-key", "s3cret".parse().unwrap());
        assert!(keys.authenticate(&h).is_ok());

        let open = ApiKeys::new(&[]).authenticate(&HeaderMap::new()).unwrap();
        assert!(open.may_see("anyone"));
        assert_eq!(open.acting_for(None, "dflt").unwrap(), "dflt");
        assert_eq!(open.acting_for(Some("globex".into()), "dflt").unwrap(), "globex");
        assert!(matches!(open.acting_for(Some("a/b".into()), "dflt"), Err(ApiError::Invalid { .. })));
    }

    /// The metric label never carries what a caller made up.
    #[test]
    fn the_tenant_label_is_a_configured_tenant_open_or_unknown() {
        let keys = acme();
        let mut h = HeaderMap::new();
        assert_eq!(keys.tenant_label(&h), "unknown");
        h.insert("x-api-key", "made-up".parse().unwrap());
        assert_eq!(keys.tenant_label(&h), "unknown");
        h.insert("x-api-key", "s3cret".parse().unwrap());
        assert_eq!(keys.tenant_label(&h), "acme");
        assert_eq!(ApiKeys::new(&[]).tenant_label(&h), "open");
    }
}
