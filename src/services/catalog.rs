//! The scope catalog at run time: `oauth_scopes`, seeded from the providers' built-in catalogs
//! (and the operator's declarations) by every `migrate`/start-up, editable by admins.
//!
//! Seeding inserts missing built-in entries and never overwrites an existing one, so an
//! admin's edit survives restarts; entries declared in `OAUTH_PROVIDERS_FILE` are the
//! operator's configuration and are written as declared on every start.

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, Utc};
use serde_json::json;
use sqlx::types::Json;

use super::audit::{self, RequestContext};
use super::{Context, ServiceError, ServiceResult};
use crate::auth::rbac::{Actor, Administer};
use crate::config::Config;
use crate::providers::catalog::{enabled_features, scopes_for_features, CatalogEntry, Sensitivity};
use crate::providers::ProviderRegistry;
use crate::storage::audit::Outcome;
use crate::storage::integrations::Integration;
use crate::storage::scopes::ScopeEntry;
use crate::storage::{Database, StorageResult};

fn row(provider: &str, entry: &CatalogEntry, is_default: bool, now: DateTime<Utc>) -> ScopeEntry {
    ScopeEntry {
        provider: provider.to_owned(),
        scope: entry.scope.clone(),
        description: entry.description.clone(),
        sensitivity: entry.sensitivity.as_str().to_owned(),
        features: Json(entry.features.clone()),
        is_default,
        created_at: now,
        updated_at: now,
    }
}

/// Writes the providers' catalogs into `oauth_scopes`; returns how many entries were added.
pub async fn seed(db: &Database, config: &Config, now: DateTime<Utc>) -> StorageResult<u64> {
    let Ok(registry) = ProviderRegistry::from_config(config) else {
        return Ok(0); // an invalid configuration is reported by whoever builds the registry
    };
    let mut added = 0;
    for provider in registry.iter() {
        let definition = &provider.definition;
        for entry in &definition.catalog {
            let is_default = definition.default_scopes.contains(&entry.scope);
            if db
                .insert_scope_if_absent(&row(&definition.name, entry, is_default, now))
                .await?
            {
                added += 1;
            }
        }
    }
    for declared in &config.declared_providers {
        let defaults = registry
            .get(&declared.name)
            .map(|p| p.definition.default_scopes.clone())
            .unwrap_or_default();
        for entry in &declared.catalog {
            db.upsert_scope(&row(
                &declared.name,
                entry,
                defaults.contains(&entry.scope),
                now,
            ))
            .await?;
        }
    }
    Ok(added)
}

fn to_entry(row: ScopeEntry) -> CatalogEntry {
    let sensitivity = match row.sensitivity.as_str() {
        "restricted" => Sensitivity::Restricted,
        "sensitive" => Sensitivity::Sensitive,
        _ => Sensitivity::Basic,
    };
    CatalogEntry {
        scope: row.scope,
        description: row.description,
        sensitivity,
        features: row.features.0,
    }
}

/// A provider's catalog as stored.
pub async fn for_provider(ctx: &Context, provider: &str) -> ServiceResult<Vec<ScopeEntry>> {
    if ctx.providers.get(provider).is_none() {
        return Err(ServiceError::UnknownProvider(provider.to_owned()));
    }
    Ok(ctx.db.list_scopes(provider).await?)
}

/// A provider's catalog, for resolving features and checking scopes.
pub async fn entries(ctx: &Context, provider: &str) -> ServiceResult<Vec<CatalogEntry>> {
    Ok(for_provider(ctx, provider)
        .await?
        .into_iter()
        .map(to_entry)
        .collect())
}

/// Which providers serve each feature, with the minimal scopes for it.
pub async fn features(
    ctx: &Context,
) -> ServiceResult<BTreeMap<String, BTreeMap<String, Vec<String>>>> {
    let mut by_provider: BTreeMap<String, Vec<CatalogEntry>> = BTreeMap::new();
    for row in ctx.db.list_all_scopes().await? {
        if ctx.providers.get(&row.provider).is_some() {
            by_provider
                .entry(row.provider.clone())
                .or_default()
                .push(to_entry(row));
        }
    }
    let mut features: BTreeMap<String, BTreeMap<String, Vec<String>>> = BTreeMap::new();
    for (provider, catalog) in &by_provider {
        let names: BTreeSet<&String> = catalog.iter().flat_map(|entry| &entry.features).collect();
        for name in names {
            if let Ok(scopes) = scopes_for_features(catalog, std::slice::from_ref(name)) {
                features
                    .entry(name.clone())
                    .or_default()
                    .insert(provider.clone(), scopes);
            }
        }
    }
    Ok(features)
}

/// What an integration's granted scopes enable, and what each other feature would need.
pub struct FeatureStatus {
    pub enabled: Vec<String>,
    /// Feature → the scopes still missing for it.
    pub available: BTreeMap<String, Vec<String>>,
}

pub async fn integration_features(
    ctx: &Context,
    integration: &Integration,
) -> ServiceResult<FeatureStatus> {
    let catalog = entries(ctx, &integration.provider).await?;
    let enabled = enabled_features(&catalog, &integration.granted_scopes);
    let all: BTreeSet<&String> = catalog.iter().flat_map(|entry| &entry.features).collect();
    let mut available = BTreeMap::new();
    for feature in all
        .into_iter()
        .filter(|feature| !enabled.contains(*feature))
    {
        if let Ok(scopes) = scopes_for_features(&catalog, std::slice::from_ref(feature)) {
            let missing = crate::oauth::difference(&scopes, &integration.granted_scopes);
            available.insert(feature.clone(), missing);
        }
    }
    Ok(FeatureStatus {
        enabled: enabled.into_iter().collect(),
        available,
    })
}

/// An admin adds or changes a catalog entry.
/// Bounds of a catalog entry's features (names such as `calendar.read`).
const MAX_FEATURES: usize = 32;
const MAX_FEATURE_CHARS: usize = 64;

pub async fn put_entry(
    ctx: &Context,
    actor: &Actor<Administer>,
    provider: &str,
    entry: CatalogEntry,
    client: &RequestContext,
) -> ServiceResult<ScopeEntry> {
    if ctx.providers.get(provider).is_none() {
        return Err(ServiceError::UnknownProvider(provider.to_owned()));
    }
    if entry.scope.trim().is_empty()
        || entry.scope.len() > 512
        || entry
            .scope
            .chars()
            .any(|c| c.is_whitespace() || c.is_control())
    {
        return Err(ServiceError::invalid(
            "invalid_scope",
            "a scope is 1-512 characters without spaces or control characters",
        ));
    }
    if entry.description.trim().is_empty()
        || entry.description.len() > 1000
        || entry.description.chars().any(char::is_control)
    {
        return Err(ServiceError::invalid(
            "invalid_description",
            "a description is 1-1000 characters without control characters",
        ));
    }
    let plain_feature = |feature: &String| {
        (1..=MAX_FEATURE_CHARS).contains(&feature.len())
            && feature.chars().all(|c| c.is_ascii_graphic())
    };
    if entry.features.len() > MAX_FEATURES || !entry.features.iter().all(plain_feature) {
        return Err(ServiceError::invalid(
            "invalid_feature",
            format!(
                "at most {MAX_FEATURES} features, each 1-{MAX_FEATURE_CHARS} printable ASCII \
                 characters without spaces"
            ),
        ));
    }
    let now = ctx.clock.now();
    let existing = ctx
        .db
        .list_scopes(provider)
        .await?
        .into_iter()
        .find(|existing| existing.scope == entry.scope);
    let created_at = existing
        .as_ref()
        .map_or(now, |existing| existing.created_at);
    let is_default = existing.is_some_and(|existing| existing.is_default);
    let stored = ScopeEntry {
        created_at,
        ..row(provider, &entry, is_default, now)
    };
    ctx.db.upsert_scope(&stored).await?;
    let event = audit::event("catalog_updated", Outcome::Success, Some(actor.user_id()), None, client, now)
        .provider(provider)
        .details(json!({"scope": entry.scope, "sensitivity": entry.sensitivity.as_str(), "features": entry.features}));
    audit::record(ctx, &event).await;
    Ok(stored)
}
