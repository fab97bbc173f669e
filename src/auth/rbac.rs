//! Role-based access control, checked by type.
//!
//! A service operation takes an `Actor<P>` where `P` names the permission it needs
//! (`Actor<ReadIntegrations>`, ...). The only way to get one is [`Principal::authorize`], which
//! fails with [`Forbidden`] when the caller's roles do not grant `P`; so a handler cannot reach an
//! operation without the check having happened. Whether the caller may touch *another* user's
//! data is the actor's [`Reach`], and [`Actor::can_access`] is the single place that compares
//! owners, so "someone else's object" is answered the same way (404) everywhere.

use std::collections::BTreeMap;
use std::fmt;
use std::marker::PhantomData;

use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum Permission {
    #[serde(rename = "integrations:read")]
    IntegrationsRead,
    #[serde(rename = "integrations:write")]
    IntegrationsWrite,
    #[serde(rename = "tokens:read")]
    TokensRead,
    #[serde(rename = "admin")]
    Admin,
}

impl Permission {
    pub const ALL: [Permission; 4] = [
        Permission::IntegrationsRead,
        Permission::IntegrationsWrite,
        Permission::TokensRead,
        Permission::Admin,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Permission::IntegrationsRead => "integrations:read",
            Permission::IntegrationsWrite => "integrations:write",
            Permission::TokensRead => "tokens:read",
            Permission::Admin => "admin",
        }
    }

    fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|p| p.as_str() == name)
    }
}

impl fmt::Display for Permission {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Whose data a granted permission covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Reach {
    OwnData,
    AnyUser,
}

/// Role name → granted permissions. Configured with `OAUTH_ROLE_PERMISSIONS`, a JSON object
/// whose values list permission names; `@any` extends a permission to every user's data:
/// `{"user": ["integrations:read", "integrations:write"], "service": ["tokens:read@any"]}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoleMap(BTreeMap<String, BTreeMap<Permission, Reach>>);

impl Default for RoleMap {
    fn default() -> Self {
        use Permission::*;
        use Reach::*;
        let roles = [
            (
                "user",
                vec![(IntegrationsRead, OwnData), (IntegrationsWrite, OwnData)],
            ),
            (
                "service",
                vec![(TokensRead, AnyUser), (IntegrationsRead, AnyUser)],
            ),
            ("admin", vec![(Admin, AnyUser)]),
        ];
        Self(
            roles
                .into_iter()
                .map(|(role, grants)| (role.to_owned(), grants.into_iter().collect()))
                .collect(),
        )
    }
}

impl RoleMap {
    pub fn from_json(json: &str) -> Result<Self, String> {
        let raw: BTreeMap<String, Vec<String>> = serde_json::from_str(json)
            .map_err(|err| format!("expected {{\"role\": [\"permission\", ...]}}: {err}"))?;
        let mut roles = BTreeMap::new();
        for (role, names) in raw {
            let mut grants = BTreeMap::new();
            for name in names {
                let (perm, reach) = match name.strip_suffix("@any") {
                    Some(base) => (base, Reach::AnyUser),
                    None => (name.as_str(), Reach::OwnData),
                };
                let perm = Permission::parse(perm).ok_or_else(|| {
                    format!(
                        "role {role:?}: unknown permission {name:?} (known: integrations:read, \
                         integrations:write, tokens:read, admin; append @any for every user's data)"
                    )
                })?;
                let reach = if perm == Permission::Admin {
                    Reach::AnyUser
                } else {
                    reach
                };
                let entry = grants.entry(perm).or_insert(reach);
                *entry = (*entry).max(reach);
            }
            roles.insert(role, grants);
        }
        Ok(Self(roles))
    }

    /// The union of what `roles` grant; unknown roles grant nothing.
    pub fn grants_for(&self, roles: &[String]) -> Grants {
        let mut grants: BTreeMap<Permission, Reach> = BTreeMap::new();
        for granted in roles.iter().filter_map(|role| self.0.get(role)) {
            for (perm, reach) in granted {
                let entry = grants.entry(*perm).or_insert(*reach);
                *entry = (*entry).max(*reach);
            }
        }
        Grants(grants)
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Grants(BTreeMap<Permission, Reach>);

impl Grants {
    /// How far `permission` reaches for this caller; `admin` implies every permission.
    pub fn reach(&self, permission: Permission) -> Option<Reach> {
        if self.0.contains_key(&Permission::Admin) {
            return Some(Reach::AnyUser);
        }
        self.0.get(&permission).copied()
    }

    pub fn permissions(&self) -> impl Iterator<Item = Permission> + '_ {
        self.0.keys().copied()
    }
}

/// An authenticated caller: the host product's user id (`sub`) and roles.
#[derive(Debug, Clone)]
pub struct Principal {
    pub user_id: String,
    pub roles: Vec<String>,
    pub grants: Grants,
}

impl Principal {
    pub fn new(user_id: impl Into<String>, roles: Vec<String>, role_map: &RoleMap) -> Self {
        let grants = role_map.grants_for(&roles);
        Self {
            user_id: user_id.into(),
            roles,
            grants,
        }
    }

    /// The one permission check: an `Actor<P>` exists only if the roles grant `P`.
    pub fn authorize<P: RequiredPermission>(&self) -> Result<Actor<P>, Forbidden> {
        match self.grants.reach(P::PERMISSION) {
            Some(reach) => Ok(Actor {
                user_id: self.user_id.clone(),
                reach,
                _permission: PhantomData,
            }),
            None => Err(Forbidden(P::PERMISSION)),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("this operation needs the {0} permission")]
pub struct Forbidden(pub Permission);

/// Marker types naming the permission an operation needs.
pub trait RequiredPermission: Send + Sync + 'static {
    const PERMISSION: Permission;
}

macro_rules! permission_marker {
    ($(#[$doc:meta])* $name:ident => $perm:expr) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy)]
        pub struct $name;
        impl RequiredPermission for $name {
            const PERMISSION: Permission = $perm;
        }
    };
}

permission_marker!(/// List and read integrations.
    ReadIntegrations => Permission::IntegrationsRead);
permission_marker!(/// Connect, change and disconnect integrations.
    WriteIntegrations => Permission::IntegrationsWrite);
permission_marker!(/// Fetch access tokens (backends).
    ReadTokens => Permission::TokensRead);
permission_marker!(/// Every user's data and the administration routes.
    Administer => Permission::Admin);

/// A caller proven to hold permission `P`, reaching its own data or every user's.
#[derive(Debug, Clone)]
pub struct Actor<P> {
    user_id: String,
    reach: Reach,
    _permission: PhantomData<P>,
}

/// Which users' rows a listing may return.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UserScope {
    One(String),
    All,
}

impl<P: RequiredPermission> Actor<P> {
    pub fn user_id(&self) -> &str {
        &self.user_id
    }

    pub fn reach(&self) -> Reach {
        self.reach
    }

    /// May this caller see or change an object owned by `owner`?
    pub fn can_access(&self, owner: &str) -> bool {
        self.reach == Reach::AnyUser || owner == self.user_id
    }

    /// The users a listing covers: own data by default; `requested` (a `?user_id=`) needs
    /// the permission to reach every user, except when it names the caller.
    pub fn list_scope(&self, requested: Option<&str>) -> Result<UserScope, Forbidden> {
        match (requested, self.reach) {
            (None, Reach::OwnData) => Ok(UserScope::One(self.user_id.clone())),
            (None, Reach::AnyUser) => Ok(UserScope::All),
            (Some(user), _) if user == self.user_id => Ok(UserScope::One(user.to_owned())),
            (Some(user), Reach::AnyUser) => Ok(UserScope::One(user.to_owned())),
            (Some(_), Reach::OwnData) => Err(Forbidden(P::PERMISSION)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn principal(roles: &[&str]) -> Principal {
        let roles = roles.iter().map(|r| (*r).to_owned()).collect();
        Principal::new("alice", roles, &RoleMap::default())
    }

    #[test]
    fn default_roles_grant_what_the_documentation_says() {
        let user = principal(&["user"]);
        assert_eq!(
            user.grants.reach(Permission::IntegrationsRead),
            Some(Reach::OwnData)
        );
        assert_eq!(
            user.grants.reach(Permission::IntegrationsWrite),
            Some(Reach::OwnData)
        );
        assert_eq!(user.grants.reach(Permission::TokensRead), None);
        let service = principal(&["service"]);
        assert_eq!(
            service.grants.reach(Permission::TokensRead),
            Some(Reach::AnyUser)
        );
        assert_eq!(
            service.grants.reach(Permission::IntegrationsRead),
            Some(Reach::AnyUser)
        );
        assert_eq!(service.grants.reach(Permission::IntegrationsWrite), None);
        let admin = principal(&["admin"]);
        for perm in Permission::ALL {
            assert_eq!(admin.grants.reach(perm), Some(Reach::AnyUser));
        }
        assert_eq!(principal(&["guest"]).grants, Grants::default());
    }

    #[test]
    fn authorize_yields_an_actor_only_with_the_permission() {
        assert!(principal(&["user"]).authorize::<ReadIntegrations>().is_ok());
        assert_eq!(
            principal(&["user"]).authorize::<ReadTokens>().map(|_| ()),
            Err(Forbidden(Permission::TokensRead))
        );
        assert!(principal(&[]).authorize::<ReadIntegrations>().is_err());
    }

    #[test]
    fn own_reach_sees_only_own_objects_and_lists() {
        let actor = principal(&["user"])
            .authorize::<ReadIntegrations>()
            .expect("granted");
        assert!(actor.can_access("alice"));
        assert!(!actor.can_access("bob"));
        assert_eq!(actor.list_scope(None), Ok(UserScope::One("alice".into())));
        assert_eq!(
            actor.list_scope(Some("alice")),
            Ok(UserScope::One("alice".into()))
        );
        assert!(actor.list_scope(Some("bob")).is_err());
        let service = principal(&["service"])
            .authorize::<ReadIntegrations>()
            .expect("granted");
        assert!(service.can_access("bob"));
        assert_eq!(
            service.list_scope(Some("bob")),
            Ok(UserScope::One("bob".into()))
        );
        assert_eq!(service.list_scope(None), Ok(UserScope::All));
    }

    #[test]
    fn role_map_parses_reach_and_rejects_unknown_permissions() {
        let map = RoleMap::from_json(r#"{"bot": ["tokens:read@any", "integrations:read"]}"#)
            .expect("parses");
        let grants = map.grants_for(&["bot".to_owned()]);
        assert_eq!(grants.reach(Permission::TokensRead), Some(Reach::AnyUser));
        assert_eq!(
            grants.reach(Permission::IntegrationsRead),
            Some(Reach::OwnData)
        );
        assert!(RoleMap::from_json(r#"{"bot": ["tokens:write"]}"#).is_err());
        assert!(RoleMap::from_json("[]").is_err());
    }
}
