//! The root of the OpenAPI 3.1 document: title, security schemes, tags, the
//! shared error responses and the request bodies that no Rust type reads
//! whole. The paths come from the handlers' `#[utoipa::path]` attributes as
//! [`super::routes`] registers them, so the document cannot list a route
//! the router lacks, nor miss one it has.

use utoipa::openapi::header::Header;
use utoipa::openapi::schema::{ArrayBuilder, OneOfBuilder, Schema, Type};
use utoipa::openapi::security::{ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{Content, Ref, RefOr, ResponseBuilder};
use utoipa::{Modify, OpenApi, PartialSchema, ToSchema};

use sluice_schemas::JobRequest;

use crate::http::ErrorBody;

/// Title, description, servers, security and the shared components; the
/// paths are added by [`super::routes`].
#[derive(OpenApi)]
#[openapi(
    info(
        title = "Sluice",
        version = "1",
        description = "Asynchronous inference jobs over Kafka. Errors are always \
            {\"error\": {\"code\", \"message\"}} with a stable code; 429 and 503 carry Retry-After. \
            With API keys configured every route under /v1 needs `Authorization: Bearer <key>` \
            (or `X-API-Key`), and a tenant only ever sees its own jobs and batches (others' are 404)."
    ),
    servers((url = "http://127.0.0.1:8080")),
    security(("bearer" = []), ("apiKey" = []), ()),
    components(
        schemas(ErrorBody),
        responses(E400, E401, E403, E404, E408, E409, E413, E422, E429, E500, E501, E503, E504)
    ),
    modifiers(&SecuritySchemes),
    tags(
        (name = "jobs", description = "Submit, read (long-poll) and cancel jobs"),
        (name = "batches", description = "JSONL files of jobs, their progress and results"),
        (name = "sql", description = "Read-only SQL over the results lake and shards"),
        (name = "search", description = "Nearest stored jobs of a text or a vector, by their embeddings"),
        (name = "callbacks", description = "Completion callbacks: the secret your deliveries are signed with"),
        (name = "ops", description = "Probes, metrics and this document (no API key needed)")
    )
)]
pub(super) struct ApiDoc;

/// `bearer` (`Authorization: Bearer <key>`) and `apiKey` (`X-API-Key`):
/// the two ways to send an API key (see `auth.rs`).
struct SecuritySchemes;

impl Modify for SecuritySchemes {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
        components.add_security_scheme("apiKey", SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::new("X-API-Key"))));
    }
}

/// One reusable error response per status: an [`ErrorBody`] and, where the
/// client should come back later, `Retry-After`.
macro_rules! error_responses {
    ($($name:ident = $description:literal $(, $retry:ident)?;)*) => {$(
        #[doc = concat!("Response component: ", $description)]
        pub(super) struct $name;

        impl<'r> utoipa::ToResponse<'r> for $name {
            fn response() -> (&'r str, RefOr<utoipa::openapi::Response>) {
                let body = Content::new(Some(Ref::from_schema_name(ErrorBody::name())));
                let response = ResponseBuilder::new().description($description).content("application/json", body);
                $( let response = error_responses!(@$retry response); )?
                (stringify!($name), response.build().into())
            }
        }
    )*};
    (@retry $response:ident) => {
        $response.header(
            "Retry-After",
            Header::builder()
                .schema(Some(utoipa::openapi::ObjectBuilder::new().schema_type(Type::Integer).minimum(Some(1))))
                .description(Some("Seconds to wait before trying again"))
                .build(),
        )
    };
}

error_responses! {
    E400 = "invalid_json: empty body or not JSON; invalid_sql: the SQL does not parse or plan";
    E401 = "unauthorized: missing or unknown API key";
    E403 = "tenant_mismatch: the body or the `tenant` parameter names another tenant than the API key's; read_only: the SQL would write";
    E404 = "not_found: no such job or batch for this tenant";
    E408 = "body_timeout: the body did not arrive within gateway.upload_timeout_ms";
    E409 = "job_finished: cancelling a job that has finished; job_id_in_use: a job id already used by another request of this tenant";
    E413 = "payload_too_large or too_many_items";
    E422 = "schema_violation, unknown_model, input_too_long, invalid_input, or invalid_json (a batch line); callback_refused: the callback's destination is not allowed (a private, loopback or link-local address not in callbacks.allow_networks, a host not in callbacks.allow_hosts, a name that does not resolve) or callbacks are off; resources_exhausted: the query needs more memory than one query may use";
    E429 = "rate_limited; see Retry-After", retry;
    E500 = "internal (Kafka or the store refused for good, a corrupt record) or query_failed";
    E501 = "sql_not_configured: no lake or shards configured; callbacks_not_configured: no callbacks.signing_key";
    E503 = "overloaded (backlog, in-flight or long-poll bound), unavailable (Kafka, the store or a shard) or resources_exhausted (the running queries hold all SQL memory); see Retry-After", retry;
    E504 = "query_timeout: the query ran past sql.timeout_ms";
}

/// A job as `POST /v1/jobs` takes it: a [`JobRequest`] whose `job_id` (a
/// UUIDv7 is made), `tenant` (the API key's, or `gateway.default_tenant`)
/// and `submitted_at` (the gateway's clock) may be left out. Described from
/// `JobRequest`'s own schema, so the two cannot drift apart.
pub(super) struct JobSubmission;

/// Fields of [`JobRequest`] that the gateway fills in when absent.
const FILLED_IN: [&str; 3] = ["job_id", "tenant", "submitted_at"];

impl PartialSchema for JobSubmission {
    fn schema() -> RefOr<Schema> {
        let mut schema = JobRequest::schema();
        if let RefOr::T(Schema::Object(object)) = &mut schema {
            object.required.retain(|field| !FILLED_IN.contains(&field.as_str()));
            object.description = Some(
                "A JobRequest v1 (schemas/json/job-request.v1.schema.json) whose job_id (a UUIDv7 is made), \
                 tenant (the API key's, or gateway.default_tenant) and submitted_at (the gateway's clock) \
                 may be left out."
                    .into(),
            );
        }
        schema
    }
}

impl ToSchema for JobSubmission {
    fn schemas(schemas: &mut Vec<(String, RefOr<Schema>)>) {
        JobRequest::schemas(schemas);
    }
}

/// The body of `POST /v1/jobs`: one job, or a non-empty array of them. The
/// handler reads it as JSON itself, so that an error names the failing item.
pub(super) struct Submission;

impl PartialSchema for Submission {
    fn schema() -> RefOr<Schema> {
        let one = || Ref::from_schema_name(JobSubmission::name());
        OneOfBuilder::new().item(one()).item(ArrayBuilder::new().items(one()).min_items(Some(1))).into()
    }
}

impl ToSchema for Submission {
    fn schemas(schemas: &mut Vec<(String, RefOr<Schema>)>) {
        schemas.push((JobSubmission::name().into_owned(), JobSubmission::schema()));
        JobSubmission::schemas(schemas);
    }
}
