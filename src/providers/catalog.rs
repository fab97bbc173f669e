//! The scope catalog: what each scope means in plain words, how sensitive it is, and which
//! product features it serves. Built-in providers ship theirs; declared providers add theirs in
//! `OAUTH_PROVIDERS_FILE`.
//!
//! Features resolve to the *least* privilege: of the scopes enabling a feature, the one enabling
//! the fewest features, then the least sensitive, then the first by name (`calendar.read` is
//! served by `calendar.readonly`, not by read-write `calendar`). The rule does not depend on the
//! order entries are stored in, so the catalog can live in the database.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, utoipa::ToSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Sensitivity {
    Basic,
    Sensitive,
    Restricted,
}

impl Sensitivity {
    pub fn as_str(self) -> &'static str {
        match self {
            Sensitivity::Basic => "basic",
            Sensitivity::Sensitive => "sensitive",
            Sensitivity::Restricted => "restricted",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CatalogEntry {
    pub scope: String,
    pub description: String,
    pub sensitivity: Sensitivity,
    /// Features this scope enables.
    #[serde(default)]
    pub features: Vec<String>,
}

impl CatalogEntry {
    pub fn new(
        scope: &str,
        description: &str,
        sensitivity: Sensitivity,
        features: &[&str],
    ) -> Self {
        Self {
            scope: scope.to_owned(),
            description: description.to_owned(),
            sensitivity,
            features: features.iter().map(|f| (*f).to_owned()).collect(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CatalogError {
    #[error("unknown feature {0:?} for this provider")]
    UnknownFeature(String),
    #[error("unknown scope {0:?} for this provider")]
    UnknownScope(String),
}

/// The minimal scopes serving `features`, or the first feature no entry serves.
pub fn scopes_for_features(
    catalog: &[CatalogEntry],
    features: &[String],
) -> Result<Vec<String>, CatalogError> {
    let mut scopes = BTreeSet::new();
    for feature in features {
        let entry = catalog
            .iter()
            .filter(|entry| entry.features.contains(feature))
            .min_by(|a, b| {
                (a.features.len(), a.sensitivity, &a.scope).cmp(&(
                    b.features.len(),
                    b.sensitivity,
                    &b.scope,
                ))
            })
            .ok_or_else(|| CatalogError::UnknownFeature(feature.clone()))?;
        scopes.insert(entry.scope.clone());
    }
    // A scope whose features another chosen scope also serves (and more) adds nothing:
    // `calendar.read` + `calendar.write` is `calendar`, not `calendar` and `calendar.readonly`.
    let features_of = |scope: &String| {
        catalog
            .iter()
            .find(|e| &e.scope == scope)
            .map(|e| e.features.clone())
            .unwrap_or_default()
    };
    let chosen: Vec<String> = scopes.iter().cloned().collect();
    scopes.retain(|scope| {
        let mine = features_of(scope);
        !chosen.iter().any(|other| {
            let theirs = features_of(other);
            other != scope && theirs.len() > mine.len() && mine.iter().all(|f| theirs.contains(f))
        })
    });
    Ok(scopes.into_iter().collect())
}

/// Checks that every scope is in the catalog.
pub fn check_known(catalog: &[CatalogEntry], scopes: &[String]) -> Result<(), CatalogError> {
    match scopes
        .iter()
        .find(|scope| !catalog.iter().any(|entry| &entry.scope == *scope))
    {
        Some(unknown) => Err(CatalogError::UnknownScope(unknown.clone())),
        None => Ok(()),
    }
}

/// The features that `granted` scopes enable.
pub fn enabled_features(catalog: &[CatalogEntry], granted: &[String]) -> BTreeSet<String> {
    catalog
        .iter()
        .filter(|entry| granted.contains(&entry.scope))
        .flat_map(|entry| entry.features.iter().cloned())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn catalog() -> Vec<CatalogEntry> {
        vec![
            CatalogEntry::new(
                "cal.read",
                "Read calendars",
                Sensitivity::Sensitive,
                &["calendar.read"],
            ),
            CatalogEntry::new(
                "cal",
                "Manage calendars",
                Sensitivity::Sensitive,
                &["calendar.read", "calendar.write"],
            ),
        ]
    }

    #[test]
    fn features_resolve_to_the_least_privileged_scope() {
        let features = |names: &[&str]| names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>();
        assert_eq!(
            scopes_for_features(&catalog(), &features(&["calendar.read"])),
            Ok(vec!["cal.read".to_owned()])
        );
        assert_eq!(
            scopes_for_features(&catalog(), &features(&["calendar.read", "calendar.write"])),
            Ok(vec!["cal".to_owned()])
        );
        assert_eq!(
            scopes_for_features(&catalog(), &features(&["teleport"])),
            Err(CatalogError::UnknownFeature("teleport".into()))
        );
    }

    #[test]
    fn every_built_in_feature_resolves_to_its_narrowest_scope() {
        use crate::providers::{google, microsoft, youtube};
        let feature = |name: &str| vec![name.to_owned()];
        let resolve =
            |catalog: &[CatalogEntry], name: &str| scopes_for_features(catalog, &feature(name));
        let google = google::catalog();
        assert_eq!(
            resolve(&google, "calendar.read"),
            Ok(vec![
                "https://www.googleapis.com/auth/calendar.readonly".into()
            ])
        );
        assert_eq!(
            resolve(&google, "calendar.write"),
            Ok(vec!["https://www.googleapis.com/auth/calendar".into()])
        );
        assert_eq!(
            resolve(&google, "email.send"),
            Ok(vec!["https://www.googleapis.com/auth/gmail.send".into()])
        );
        let microsoft = microsoft::catalog();
        assert_eq!(
            resolve(&microsoft, "calendar.read"),
            Ok(vec!["Calendars.Read".into()])
        );
        assert_eq!(
            resolve(&microsoft, "files"),
            Ok(vec!["Files.ReadWrite".into()])
        );
        let youtube = youtube::catalog();
        assert_eq!(
            resolve(&youtube, "youtube.read"),
            Ok(vec![youtube::READONLY_SCOPE.into()])
        );
        assert!(
            resolve(&youtube, "calendar.read").is_err(),
            "YouTube serves no calendar"
        );
    }

    #[test]
    fn granted_scopes_enable_features() {
        let enabled = enabled_features(&catalog(), &["cal".to_owned()]);
        assert!(enabled.contains("calendar.write") && enabled.contains("calendar.read"));
        assert!(check_known(&catalog(), &["nope".to_owned()]).is_err());
    }
}
