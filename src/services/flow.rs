//! The connect flow: OAuth 2.0 authorization code with PKCE (RFC 6749 §4.1, RFC 7636), hardened
//! per RFC 9700: single-use, short-lived, server-side `state`; S256 PKCE where the provider
//! supports it; `nonce` and full ID-token validation for OpenID providers; RFC 9207 `iss`
//! checks; the code only ever sent to the token endpoint of the provider the state names.
//!
//! [`start`] records a pending authorization and returns the provider's URL; [`complete`]
//! handles the browser's return and saves the integration, its tokens and the consent in one
//! transaction, then appends the audit event. Nothing is stored when anything fails.

use chrono::{DateTime, Duration, Utc};
use secrecy::SecretString;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use sqlx::types::Json;
use url::Url;
use uuid::Uuid;

use super::audit::{self, RequestContext};
use super::catalog;
use super::vault::{pkce_verifier_aad, TokenOwner, TokenSet};
use super::{Context, ServiceError, ServiceResult};
use crate::auth::rbac::{Actor, WriteIntegrations};
use crate::oauth::{
    self, parse_scopes, random_urlsafe, request_token, validate_id_token, FailureClass,
    IdTokenClaims, IdTokenExpectations, IssuerRule, Pkce, TokenError, TokenGrant, TokenResponse,
};
use crate::providers::catalog::{check_known, scopes_for_features, CatalogEntry};
use crate::providers::{
    google, microsoft, notion, youtube, Protocol, Provider, ProviderDefinition, ProviderKind,
};
use crate::storage::audit::Outcome;
use crate::storage::consents::Consent;
use crate::storage::integrations::{Integration, NewConnection, SavedConnection};
use crate::storage::state::PendingAuthorization;
use crate::storage::StorageError;

/// How long a started authorization may take to come back.
pub const STATE_LIFETIME: Duration = Duration::minutes(10);
/// Clock skew tolerated on ID-token `exp`/`iat`.
const ID_TOKEN_LEEWAY: Duration = Duration::minutes(2);
const STATE_BYTES: usize = 32;
const NONCE_BYTES: usize = 32;
const MAX_ERROR_DESCRIPTION_CHARS: usize = 300;

/// What the caller asks for: scopes directly, or features resolved through the catalog.
#[derive(Debug, Clone, Default)]
pub struct AuthorizeRequest {
    pub scopes: Vec<String>,
    pub features: Vec<String>,
    pub return_to: Option<String>,
    /// Ask for more scopes on this existing integration (incremental authorization).
    pub integration_id: Option<Uuid>,
}

#[derive(Debug, Clone)]
pub struct AuthorizationStart {
    pub authorization_url: String,
    pub state: String,
    pub expires_at: DateTime<Utc>,
    /// The scopes the provider is asked for.
    pub scopes: Vec<String>,
}

pub async fn start(
    ctx: &Context,
    actor: &Actor<WriteIntegrations>,
    provider_name: &str,
    request: AuthorizeRequest,
    client: &RequestContext,
) -> ServiceResult<AuthorizationStart> {
    let provider = configured_provider(ctx, provider_name)?;
    let definition = &provider.definition;
    let return_to = request
        .return_to
        .as_deref()
        .map(|url| check_return_to(&ctx.allowed_return_urls, url))
        .transpose()?;
    let existing = match request.integration_id {
        Some(id) => Some(Box::pin(owned_integration(ctx, actor, id, provider_name, client)).await?),
        None => None,
    };
    let catalog = catalog::entries(ctx, provider_name).await?;
    let scopes = scopes_to_request(definition, &catalog, &request, existing.as_ref())?;
    let holds_refresh_token = match &existing {
        Some(integration) => ctx
            .db
            .get_tokens(integration.id)
            .await?
            .is_some_and(|tokens| tokens.refresh_token.is_some()),
        None => false,
    };
    let now = ctx.clock.now();
    let state = random_urlsafe(STATE_BYTES);
    let pkce = definition.pkce.then(Pkce::generate);
    let nonce = (definition.protocol() == Protocol::Oidc).then(|| random_urlsafe(NONCE_BYTES));
    let pending = PendingAuthorization {
        id: Uuid::now_v7(),
        state_hash: state_hash(&state),
        user_id: actor.user_id().to_owned(),
        provider: provider_name.to_owned(),
        redirect_uri: ctx.redirect_uri(provider_name),
        requested_scopes: Json(scopes.clone()),
        integration_id: existing.as_ref().map(|integration| integration.id),
        return_to: return_to.map(String::from),
        key_id: ctx.vault.keyring().active_key_id().to_owned(),
        pkce_verifier: None,
        nonce: nonce.clone(),
        client_ip: client.client_ip.clone(),
        user_agent: client.user_agent.clone(),
        created_at: now,
        expires_at: now + STATE_LIFETIME,
        used_at: None,
        result_integration_id: None,
        result_error: None,
    };
    let pending = PendingAuthorization {
        pkce_verifier: pkce
            .as_ref()
            .map(|pkce| {
                let row_id = pending.id.to_string();
                ctx.vault
                    .keyring()
                    .seal(&pkce.verifier, pkce_verifier_aad(&row_id, &pending.user_id))
            })
            .transpose()?,
        ..pending
    };
    ctx.db.insert_pending_authorization(&pending).await?;
    let parameters = AuthorizationParameters {
        client_id: provider.client_id.as_deref().unwrap_or_default(),
        redirect_uri: &pending.redirect_uri,
        scopes: &scopes,
        state: &state,
        code_challenge: pkce.as_ref().map(|pkce| pkce.challenge.as_str()),
        nonce: nonce.as_deref(),
        prompt: prompt(definition, holds_refresh_token),
    };
    let authorization_url = authorization_url(definition, &parameters);
    let event = audit::event(
        "authorize_started",
        Outcome::Success,
        Some(actor.user_id()),
        Some(actor.user_id()),
        client,
        now,
    )
    .provider(provider_name)
    .integration(pending.integration_id)
    .details(json!({"scopes": scopes}));
    // Not waited for: a sign-in's start changes nothing a crash could not lose with it (the
    // pending row), and its commit was half of this route's time on PostgreSQL.
    audit::record_queued(ctx, event).await;
    Ok(AuthorizationStart {
        authorization_url,
        state,
        expires_at: pending.expires_at,
        scopes,
    })
}

fn configured_provider<'a>(ctx: &'a Context, name: &str) -> ServiceResult<&'a Provider> {
    let provider = ctx
        .providers
        .get(name)
        .ok_or_else(|| ServiceError::UnknownProvider(name.to_owned()))?;
    if let Some(reason) = &provider.unavailable {
        return Err(ServiceError::ProviderNotConfigured {
            provider: name.to_owned(),
            missing: vec![reason.clone()],
        });
    }
    if !provider.is_configured() {
        return Err(ServiceError::ProviderNotConfigured {
            provider: name.to_owned(),
            missing: provider.missing_variables(),
        });
    }
    Ok(provider)
}

const MAX_RETURN_TO_BYTES: usize = 2048;

/// `return_to` must share the origin of an allowed URL and extend its path at a segment
/// boundary, so the service is never an open redirector (RFC 9700 §4.11).
pub fn check_return_to(allowed: &[Url], candidate: &str) -> ServiceResult<Url> {
    let rejected = || {
        ServiceError::invalid(
            "return_to_not_allowed",
            "return_to is not under any URL in OAUTH_ALLOWED_RETURN_URLS",
        )
    };
    // The result is appended and the URL becomes a `Location` header: keep it well within
    // what browsers and proxies take.
    if candidate.len() > MAX_RETURN_TO_BYTES {
        return Err(ServiceError::invalid(
            "return_to_not_allowed",
            format!("return_to is longer than {MAX_RETURN_TO_BYTES} bytes"),
        ));
    }
    let url = Url::parse(candidate).map_err(|_| rejected())?;
    if !url.username().is_empty() || url.password().is_some() {
        return Err(rejected());
    }
    let allowed_here = allowed.iter().any(|base| {
        let prefix = base.path().trim_end_matches('/');
        base.origin() == url.origin()
            && (url.path() == base.path()
                || url.path() == prefix
                || url.path().starts_with(&format!("{prefix}/")))
    });
    if allowed_here {
        Ok(url)
    } else {
        Err(rejected())
    }
}

async fn owned_integration(
    ctx: &Context,
    actor: &Actor<WriteIntegrations>,
    id: Uuid,
    provider: &str,
    client: &RequestContext,
) -> ServiceResult<Integration> {
    let integration = super::integrations::visible(ctx, actor, id, client).await?;
    if integration.user_id != actor.user_id() {
        // Authorizing on behalf of someone else would bind *their* integration to the
        // caller's browser session: admins read, they do not consent for users.
        return Err(ServiceError::NotFound);
    }
    if integration.provider != provider {
        return Err(ServiceError::invalid(
            "integration_provider_mismatch",
            format!(
                "integration {id} belongs to provider {}",
                integration.provider
            ),
        ));
    }
    Ok(integration)
}

/// Defaults ∪ the features' scopes ∪ explicit scopes; for an existing integration, Google asks
/// only for what is missing (`include_granted_scopes` keeps the rest), other providers for the
/// union with what is held (a new token replaces the old one).
fn scopes_to_request(
    definition: &ProviderDefinition,
    catalog: &[CatalogEntry],
    request: &AuthorizeRequest,
    existing: Option<&Integration>,
) -> ServiceResult<Vec<String>> {
    let catalog_error = |err: crate::providers::catalog::CatalogError| {
        let code = match err {
            crate::providers::catalog::CatalogError::UnknownFeature(_) => "unknown_feature",
            crate::providers::catalog::CatalogError::UnknownScope(_) => "unknown_scope",
        };
        ServiceError::invalid(code, format!("{err} ({})", definition.name))
    };
    // Features the held scopes already enable need nothing new.
    let held = existing
        .map(|integration| integration.granted_scopes.as_slice())
        .unwrap_or_default();
    let enabled = crate::providers::catalog::enabled_features(catalog, held);
    let needed: Vec<String> = request
        .features
        .iter()
        .filter(|f| !enabled.contains(*f))
        .cloned()
        .collect();
    let from_features = scopes_for_features(catalog, &needed).map_err(catalog_error)?;
    check_known(catalog, &request.scopes).map_err(catalog_error)?;
    let wanted = oauth::union(
        &oauth::union(&definition.default_scopes, &from_features),
        &request.scopes,
    );
    let Some(existing) = existing else {
        return Ok(wanted);
    };
    Ok(match definition.kind {
        ProviderKind::Google | ProviderKind::YouTube => oauth::union(
            &definition.default_scopes,
            &oauth::difference(&wanted, &existing.granted_scopes),
        ),
        _ => oauth::union(&wanted, &existing.granted_scopes),
    })
}

fn prompt(definition: &ProviderDefinition, holds_refresh_token: bool) -> Option<&'static str> {
    if definition.authorization_params.contains_key("prompt") {
        return None;
    }
    match definition.kind {
        ProviderKind::Google => google::prompt(holds_refresh_token),
        ProviderKind::YouTube => Some(youtube::PROMPT),
        _ => None,
    }
}

struct AuthorizationParameters<'a> {
    client_id: &'a str,
    redirect_uri: &'a str,
    scopes: &'a [String],
    state: &'a str,
    code_challenge: Option<&'a str>,
    nonce: Option<&'a str>,
    prompt: Option<&'static str>,
}

fn authorization_url(
    definition: &ProviderDefinition,
    parameters: &AuthorizationParameters<'_>,
) -> String {
    let mut url = definition.authorization_url.clone();
    {
        let mut query = url.query_pairs_mut();
        query
            .append_pair("response_type", "code")
            .append_pair("client_id", parameters.client_id)
            .append_pair("redirect_uri", parameters.redirect_uri);
        // Notion has no OAuth scopes: its capabilities are set on the integration.
        if definition.kind != ProviderKind::Notion && !parameters.scopes.is_empty() {
            query.append_pair(
                "scope",
                &oauth::join_scopes(parameters.scopes, &definition.scope_separator),
            );
        }
        query.append_pair("state", parameters.state);
        if let Some(challenge) = parameters.code_challenge {
            query
                .append_pair("code_challenge", challenge)
                .append_pair("code_challenge_method", oauth::pkce::METHOD);
        }
        if let Some(nonce) = parameters.nonce {
            query.append_pair("nonce", nonce);
        }
        if let Some(prompt) = parameters.prompt {
            query.append_pair("prompt", prompt);
        }
        for (name, value) in &definition.authorization_params {
            query.append_pair(name, value);
        }
    }
    url.into()
}

fn state_hash(state: &str) -> Vec<u8> {
    Sha256::digest(state.as_bytes()).to_vec()
}

/// The query of the provider's redirect back to us; unknown parameters are ignored.
#[derive(Debug, Clone, Default)]
pub struct CallbackParams {
    pub code: Option<String>,
    pub state: Option<String>,
    pub error: Option<String>,
    pub error_description: Option<String>,
    pub iss: Option<String>,
}

/// Why a callback failed: a stable `code` for programs, a sentence for people.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallbackError {
    pub code: &'static str,
    pub description: String,
}

impl CallbackError {
    fn new(code: &'static str, description: impl Into<String>) -> Self {
        Self {
            code,
            description: description.into(),
        }
    }

    fn internal(err: &dyn std::fmt::Display) -> Self {
        tracing::error!(error = %err, "connect flow failed internally");
        Self::new(
            "internal_error",
            "the connection could not be saved; it has been logged",
        )
    }
}

#[derive(Debug, Clone)]
pub struct CallbackOutcome {
    pub provider: String,
    /// Where to send the browser, when the flow asked for it.
    pub return_to: Option<Url>,
    pub result: Result<Integration, CallbackError>,
}

pub async fn complete(
    ctx: &Context,
    provider_name: &str,
    params: CallbackParams,
    client: &RequestContext,
) -> CallbackOutcome {
    let outcome = |return_to: Option<Url>, result| CallbackOutcome {
        provider: provider_name.to_owned(),
        return_to,
        result,
    };
    let Some(state) = params.state.as_deref().filter(|state| !state.is_empty()) else {
        return outcome(
            None,
            Err(CallbackError::new(
                "invalid_state",
                "the callback carries no state",
            )),
        );
    };
    let now = ctx.clock.now();
    let hash = state_hash(state);
    let pending = match ctx.db.consume_pending_authorization(&hash, now).await {
        Ok(Some(pending)) => pending,
        Ok(None) => return replayed(ctx, provider_name, &hash).await,
        Err(err) => return outcome(None, Err(CallbackError::internal(&err))),
    };
    let return_to = pending
        .return_to
        .as_deref()
        .and_then(|url| Url::parse(url).ok());
    let result = finish(ctx, provider_name, &pending, &params, client, now).await;
    // A saved connection recorded its result with it.
    if let Err(err) = &result {
        if let Err(db_err) = ctx
            .db
            .record_authorization_result(pending.id, None, Some(err.code))
            .await
        {
            tracing::warn!(error = %db_err, "could not record the authorization result");
        }
        let event = audit::event(
            "callback",
            Outcome::Failure,
            Some(&pending.user_id),
            Some(&pending.user_id),
            client,
            now,
        )
        .provider(provider_name)
        .integration(pending.integration_id)
        .reason(err.code);
        audit::record(ctx, &event).await;
    }
    outcome(return_to, result)
}

/// A state that is not pending: unknown, or already used. A replay of a completed callback
/// gets the first callback's result, and never a second code exchange (F12).
async fn replayed(ctx: &Context, provider_name: &str, hash: &[u8]) -> CallbackOutcome {
    let pending = ctx.db.find_pending_authorization(hash).await.ok().flatten();
    let Some(pending) = pending.filter(|pending| pending.provider == provider_name) else {
        return CallbackOutcome {
            provider: provider_name.to_owned(),
            return_to: None,
            result: Err(CallbackError::new(
                "invalid_state",
                "this authorization request is unknown or has expired",
            )),
        };
    };
    let first_result = match (
        pending.result_integration_id,
        pending.result_error.as_deref(),
    ) {
        (Some(id), _) => ctx.db.get_integration(id).await.ok().flatten(),
        _ => None,
    };
    let result = match first_result {
        Some(integration) => Ok(integration),
        None => Err(CallbackError::new(
            "state_already_used",
            "this authorization response was already received; start the connection again",
        )),
    };
    CallbackOutcome {
        provider: provider_name.to_owned(),
        return_to: pending
            .return_to
            .as_deref()
            .and_then(|url| Url::parse(url).ok()),
        result,
    }
}

async fn finish(
    ctx: &Context,
    provider_name: &str,
    pending: &PendingAuthorization,
    params: &CallbackParams,
    client: &RequestContext,
    now: DateTime<Utc>,
) -> Result<Integration, CallbackError> {
    if pending.expires_at <= now {
        return Err(CallbackError::new(
            "state_expired",
            "the authorization took too long; start again",
        ));
    }
    if pending.provider != provider_name {
        return Err(CallbackError::new(
            "provider_mismatch",
            "this callback is not for the provider the authorization was started with",
        ));
    }
    let provider = configured_provider(ctx, provider_name)
        .map_err(|err| CallbackError::new("provider_not_configured", err.to_string()))?;
    check_issuer(&provider.definition, params.iss.as_deref())?;
    if let Some(error) = &params.error {
        return Err(provider_refusal(error, params.error_description.as_deref()));
    }
    let code = params
        .code
        .as_deref()
        .filter(|code| !code.is_empty())
        .ok_or_else(|| {
            CallbackError::new("missing_code", "the callback carries no authorization code")
        })?;
    let verifier = open_verifier(ctx, pending)?;
    let credentials = provider.credentials().ok_or_else(|| {
        CallbackError::new("provider_not_configured", "client credentials are missing")
    })?;
    let grant = TokenGrant::AuthorizationCode {
        code,
        redirect_uri: &pending.redirect_uri,
        code_verifier: verifier.as_ref(),
    };
    let tokens = request_token(
        &ctx.http,
        &provider.definition.token_endpoint(),
        &credentials,
        grant,
    )
    .await
    .map_err(|err| exchange_error(provider_name, &err))?;
    // Boxed, as every step of a sign-in that is much larger than the wait for the provider
    // before it: inline, their states would size the whole callback for all of its life
    // (7 KiB instead of 2; see `services` on future sizes).
    let identity = Box::pin(identify(ctx, provider, &tokens, pending, now)).await?;
    Box::pin(save(ctx, provider, pending, tokens, identity, client, now)).await
}

/// RFC 9207: an `iss` in the response must be the issuer the state expects; where the provider
/// says it always sends one, its absence is an error too (mix-up defence, RFC 9700 §4.4).
fn check_issuer(definition: &ProviderDefinition, iss: Option<&str>) -> Result<(), CallbackError> {
    let mismatch = || {
        CallbackError::new(
            "issuer_mismatch",
            "the response came from an unexpected issuer",
        )
    };
    match (iss, definition.issuer_rule()) {
        (Some(iss), Some(IssuerRule::Exact(expected))) if iss != expected => Err(mismatch()),
        (Some(iss), Some(IssuerRule::TenantTemplate(template)))
            if !matches_template(&template, iss) =>
        {
            Err(mismatch())
        }
        (None, _) if definition.iss_parameter_supported => Err(CallbackError::new(
            "issuer_missing",
            "the provider always identifies itself, but this response did not",
        )),
        _ => Ok(()),
    }
}

fn matches_template(template: &str, iss: &str) -> bool {
    let Some((prefix, suffix)) = template.split_once("{tenantid}") else {
        return template == iss;
    };
    iss.strip_prefix(prefix)
        .and_then(|rest| rest.strip_suffix(suffix))
        .is_some_and(|tenant| {
            !tenant.is_empty()
                && tenant
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-')
        })
}

fn provider_refusal(error: &str, description: Option<&str>) -> CallbackError {
    let description: String = description
        .unwrap_or("the provider did not authorize the connection")
        .chars()
        .filter(|c| !c.is_control())
        .take(MAX_ERROR_DESCRIPTION_CHARS)
        .collect();
    match error {
        "access_denied" => CallbackError::new("access_denied", description),
        _ => CallbackError::new("provider_error", description),
    }
}

fn open_verifier(
    ctx: &Context,
    pending: &PendingAuthorization,
) -> Result<Option<SecretString>, CallbackError> {
    let Some(sealed) = pending.pkce_verifier.as_deref() else {
        return Ok(None);
    };
    let row_id = pending.id.to_string();
    ctx.vault
        .keyring()
        .open(
            &pending.key_id,
            sealed,
            pkce_verifier_aad(&row_id, &pending.user_id),
        )
        .map(Some)
        .map_err(|err| CallbackError::internal(&err))
}

fn exchange_error(provider: &str, err: &TokenError) -> CallbackError {
    match err.class() {
        FailureClass::InvalidClient => {
            tracing::error!(provider, error = %err, "the provider rejected our client credentials: check the configuration");
            CallbackError::new(
                "provider_misconfigured",
                "the provider rejected this service's credentials",
            )
        }
        FailureClass::Transient => CallbackError::new(
            "provider_unavailable",
            format!("the provider is unavailable: {err}"),
        ),
        _ => match err {
            TokenError::UnsupportedTokenType(_) => {
                CallbackError::new("unsupported_token_type", err.to_string())
            }
            TokenError::InvalidResponse(_) => {
                CallbackError::new("invalid_provider_response", err.to_string())
            }
            _ => CallbackError::new("token_exchange_failed", err.to_string()),
        },
    }
}

/// The connected account, keyed on stable ids (never on email).
struct AccountIdentity {
    account_id: String,
    email: Option<String>,
    name: Option<String>,
    metadata: Value,
}

async fn identify(
    ctx: &Context,
    provider: &Provider,
    tokens: &TokenResponse,
    pending: &PendingAuthorization,
    now: DateTime<Utc>,
) -> Result<AccountIdentity, CallbackError> {
    let definition = &provider.definition;
    match definition.kind {
        ProviderKind::Notion => {
            let account = notion::account(&tokens.extra).ok_or_else(|| {
                CallbackError::new("invalid_provider_response", "Notion returned no bot_id")
            })?;
            Ok(AccountIdentity {
                account_id: account.bot_id,
                email: account.email,
                name: account.name,
                metadata: account.metadata,
            })
        }
        ProviderKind::Microsoft => {
            let claims = id_token_claims(provider, tokens, pending, now).await?;
            let (account_id, metadata) = microsoft::account(&claims).ok_or_else(|| {
                CallbackError::new("id_token_invalid", "the ID token lacks tid or oid")
            })?;
            let email = claims.email.clone().or(claims.preferred_username.clone());
            Ok(AccountIdentity {
                account_id,
                email,
                name: claims.name,
                metadata,
            })
        }
        ProviderKind::Google => {
            let claims = id_token_claims(provider, tokens, pending, now).await?;
            Ok(AccountIdentity {
                account_id: claims.subject,
                email: claims.email,
                name: claims.name,
                metadata: json!({"issuer": claims.issuer}),
            })
        }
        ProviderKind::YouTube => youtube_identity(ctx, provider, tokens, pending, now).await,
        ProviderKind::Generic => generic_identity(ctx, provider, tokens, pending, now).await,
    }
}

async fn id_token_claims(
    provider: &Provider,
    tokens: &TokenResponse,
    pending: &PendingAuthorization,
    now: DateTime<Utc>,
) -> Result<IdTokenClaims, CallbackError> {
    let missing = || CallbackError::new("id_token_missing", "the provider returned no ID token");
    let token = tokens.id_token.as_ref().ok_or_else(missing)?;
    let (Some(jwks), Some(issuer), Some(client_id)) = (
        provider.jwks.as_deref(),
        provider.definition.issuer_rule(),
        provider.client_id.as_deref(),
    ) else {
        return Err(missing());
    };
    let expected = IdTokenExpectations {
        issuer: &issuer,
        client_id,
        nonce: pending.nonce.as_deref(),
        now,
        leeway: ID_TOKEN_LEEWAY,
    };
    validate_id_token(secrecy::ExposeSecret::expose_secret(token), jwks, &expected)
        .await
        .map_err(|err| CallbackError::new(err.code(), err.to_string()))
}

async fn youtube_identity(
    ctx: &Context,
    provider: &Provider,
    tokens: &TokenResponse,
    pending: &PendingAuthorization,
    now: DateTime<Utc>,
) -> Result<AccountIdentity, CallbackError> {
    let claims = id_token_claims(provider, tokens, pending, now).await?;
    let mut url = provider.definition.channels_url.clone().ok_or_else(|| {
        CallbackError::new("identity_unavailable", "no channels endpoint configured")
    })?;
    url.query_pairs_mut()
        .append_pair("part", "id,snippet")
        .append_pair("mine", "true");
    let response = oauth::get_json_with_bearer(&ctx.http, &url, &tokens.access_token)
        .await
        .map_err(|err| {
            CallbackError::new(
                "identity_unavailable",
                format!("channels.list failed: {err}"),
            )
        })?;
    let channel = youtube::channel(&response).ok_or_else(|| {
        CallbackError::new(
            "no_youtube_channel",
            "this Google account has no YouTube channel; create one or pick another account",
        )
    })?;
    Ok(AccountIdentity {
        account_id: format!("{}:{}", claims.subject, channel.id),
        email: claims.email,
        name: channel.title.clone().or(claims.name),
        metadata: youtube::channel_metadata(&channel),
    })
}

/// Declared providers: OpenID ones by `iss` + `sub` from the ID token (and the userinfo `sub`
/// must agree, OIDC Core §5.3.2); plain OAuth ones by the userinfo `sub` or `id`.
async fn generic_identity(
    ctx: &Context,
    provider: &Provider,
    tokens: &TokenResponse,
    pending: &PendingAuthorization,
    now: DateTime<Utc>,
) -> Result<AccountIdentity, CallbackError> {
    let userinfo = match &provider.definition.userinfo_url {
        Some(url) => Some(
            oauth::get_json_with_bearer(&ctx.http, url, &tokens.access_token)
                .await
                .map_err(|err| {
                    CallbackError::new("identity_unavailable", format!("userinfo failed: {err}"))
                })?,
        ),
        None => None,
    };
    let text = |key: &str| {
        userinfo.as_ref().and_then(|info| match info.get(key) {
            Some(Value::String(text)) => Some(text.clone()),
            Some(Value::Number(number)) => Some(number.to_string()),
            _ => None,
        })
    };
    if provider.definition.protocol() == Protocol::Oidc {
        let claims = id_token_claims(provider, tokens, pending, now).await?;
        if text("sub").is_some_and(|sub| sub != claims.subject) {
            return Err(CallbackError::new(
                "identity_mismatch",
                "userinfo and ID token name different users",
            ));
        }
        return Ok(AccountIdentity {
            account_id: format!("{}#{}", claims.issuer, claims.subject),
            email: claims.email.or(text("email")),
            name: claims.name.or(text("name")),
            metadata: json!({"issuer": claims.issuer}),
        });
    }
    let account_id = text("sub").or(text("id")).ok_or_else(|| {
        CallbackError::new(
            "identity_unavailable",
            "the provider did not say who the user is",
        )
    })?;
    Ok(AccountIdentity {
        account_id,
        email: text("email"),
        name: text("name"),
        metadata: json!({}),
    })
}

/// The scopes the provider reports granting (a user may untick some at the consent screen),
/// or, when it does not say, the requested ones (RFC 6749 §5.1).
fn granted_scopes(
    definition: &ProviderDefinition,
    tokens: &TokenResponse,
    requested: &[String],
    held: &[String],
) -> Vec<String> {
    let Some(raw) = tokens.scope.as_deref().filter(|raw| !raw.trim().is_empty()) else {
        return oauth::union(requested, held);
    };
    let reported = reported_scopes(definition, raw, requested);
    match definition.kind {
        // include_granted_scopes: the new grant covers everything granted before.
        ProviderKind::Google | ProviderKind::YouTube => oauth::union(&reported, held),
        _ => reported,
    }
}

/// A token response's `scope`, in the catalog's spelling. Microsoft's resource token omits
/// the sign-in scopes, so those of `expected` are kept.
pub(crate) fn reported_scopes(
    definition: &ProviderDefinition,
    raw: &str,
    expected: &[String],
) -> Vec<String> {
    let reported: Vec<String> = parse_scopes(raw, &definition.scope_separator)
        .iter()
        .map(|scope| match definition.kind {
            ProviderKind::Google | ProviderKind::YouTube => google::normalize_scope(scope),
            ProviderKind::Microsoft => microsoft::normalize_scope(scope),
            _ => scope.clone(),
        })
        .collect();
    if definition.kind != ProviderKind::Microsoft {
        return oauth::union(&reported, &[]);
    }
    let sign_in: Vec<String> = expected
        .iter()
        .filter(|scope| microsoft::OPENID_SCOPES.contains(&scope.as_str()))
        .cloned()
        .collect();
    oauth::union(&reported, &sign_in)
}

async fn save(
    ctx: &Context,
    provider: &Provider,
    pending: &PendingAuthorization,
    tokens: TokenResponse,
    identity: AccountIdentity,
    client: &RequestContext,
    now: DateTime<Utc>,
) -> Result<Integration, CallbackError> {
    let definition = &provider.definition;
    let requested = &pending.requested_scopes.0;
    let held = match pending.integration_id {
        Some(id) => ctx
            .db
            .get_integration(id)
            .await
            .map_err(|err| CallbackError::internal(&err))?
            .filter(|integration| integration.provider_account_id == identity.account_id)
            .map(|integration| integration.granted_scopes)
            .unwrap_or_default(),
        None => Vec::new(),
    };
    let granted = granted_scopes(definition, &tokens, requested, &held);
    let denied = oauth::difference(requested, &granted);
    let connection = NewConnection {
        proposed_id: Uuid::now_v7(),
        user_id: &pending.user_id,
        provider: &pending.provider,
        provider_account_id: &identity.account_id,
        account_email: identity.email.as_deref(),
        account_name: identity.name.as_deref(),
        account_metadata: &identity.metadata,
        granted_scopes: &granted,
        requested_scopes: requested,
        now,
        authorization_id: pending.id,
    };
    let mut consent = Consent {
        id: Uuid::now_v7(),
        user_id: pending.user_id.clone(),
        provider: pending.provider.clone(),
        integration_id: None,
        scopes_granted: Json(granted.clone()),
        scopes_denied: Json(denied.clone()),
        descriptions_shown: Json(descriptions(
            &catalog::entries(ctx, &pending.provider)
                .await
                .unwrap_or_default(),
            requested,
        )),
        client_ip: client.client_ip.clone(),
        user_agent: client.user_agent.clone(),
        granted_at: now,
        withdrawn_at: None,
    };
    let event = audit::event(
        "callback",
        Outcome::Success,
        Some(&pending.user_id),
        Some(&pending.user_id),
        client,
        now,
    )
    .provider(&pending.provider)
    .details(json!({"granted_scopes": granted, "denied_scopes": denied}));
    let seal = |integration_id: Uuid, previous: Option<&crate::storage::tokens::SealedTokens>| {
        let owner = TokenOwner {
            integration_id,
            user_id: &pending.user_id,
        };
        // Google omits the refresh token when one was issued before: keep the old one (F3).
        let refresh_token = match (&tokens.refresh_token, previous) {
            (Some(fresh), _) => Some(fresh.clone()),
            (None, Some(previous)) => ctx.vault.open(&pending.user_id, previous)?.refresh_token,
            (None, None) => None,
        };
        let set = TokenSet {
            access_token: tokens.access_token.clone(),
            refresh_token,
            id_token: tokens.id_token.clone(),
            token_type: "Bearer".to_owned(),
            expires_at: tokens
                .expires_in
                .map(|seconds| now + Duration::seconds(seconds)),
            refresh_token_expires_at: None,
        };
        ctx.vault.seal(owner, &set, now).map_err(StorageError::from)
    };
    let saved: SavedConnection = ctx
        .db
        .save_connection(&connection, seal, &mut consent)
        .await
        .map_err(|err| CallbackError::internal(&err))?;
    // A reconnect replaced the tokens (and maybe the scopes).
    ctx.tokens_cache.forget(saved.integration.id);
    audit::record(ctx, &event.integration(Some(saved.integration.id))).await;
    Ok(saved.integration)
}

/// The catalog's words for each requested scope, as the user was shown them.
fn descriptions(catalog: &[CatalogEntry], scopes: &[String]) -> Value {
    Value::Array(
        scopes
            .iter()
            .map(|scope| {
                let entry = catalog.iter().find(|entry| &entry.scope == scope);
                json!({
                    "scope": scope,
                    "description": entry.map(|e| e.description.clone()),
                    "sensitivity": entry.map(|e| e.sensitivity.as_str()),
                })
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn urls(items: &[&str]) -> Vec<Url> {
        items
            .iter()
            .map(|item| Url::parse(item).expect("url"))
            .collect()
    }

    #[test]
    fn return_to_must_share_origin_and_extend_the_path_at_a_segment() {
        let allowed = urls(&["https://app.example.com/settings", "http://localhost:3000/"]);
        for ok in [
            "https://app.example.com/settings",
            "https://app.example.com/settings/integrations?tab=2",
            "http://localhost:3000/anything",
        ] {
            assert!(check_return_to(&allowed, ok).is_ok(), "{ok}");
        }
        for bad in [
            "https://evil.example",
            "https://app.example.com/settingsX",
            "https://app.example.com/other",
            "http://app.example.com/settings",
            "https://app.example.com:8443/settings",
            "https://app.example.com@evil.example/settings",
            "https://user:pw@app.example.com/settings",
            "//evil.example/settings",
            "javascript:alert(1)",
        ] {
            assert!(check_return_to(&allowed, bad).is_err(), "{bad}");
        }
        assert!(check_return_to(&[], "https://app.example.com/settings").is_err());
    }

    #[test]
    fn tenant_templates_match_only_a_tenant_id() {
        let template = "https://login.microsoftonline.com/{tenantid}/v2.0";
        assert!(matches_template(
            template,
            "https://login.microsoftonline.com/9188040d-6c67-4c5b-b112-36a304b66dad/v2.0"
        ));
        assert!(!matches_template(
            template,
            "https://login.microsoftonline.com//v2.0"
        ));
        assert!(!matches_template(
            template,
            "https://login.microsoftonline.com/a/b/v2.0"
        ));
        assert!(!matches_template(template, "https://evil.example/x/v2.0"));
    }

    #[test]
    fn provider_error_text_is_bounded_and_stripped() {
        let long = format!("{}\u{7}", "x".repeat(1000));
        let err = provider_refusal("server_error", Some(&long));
        assert_eq!(err.code, "provider_error");
        assert_eq!(err.description.chars().count(), MAX_ERROR_DESCRIPTION_CHARS);
        assert_eq!(
            provider_refusal("access_denied", None).code,
            "access_denied"
        );
    }
}
