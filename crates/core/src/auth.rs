//! Capabilities, the seven scopes and the roles that satisfy them (DESIGN §9).

use std::fmt;

use serde::{Deserialize, Serialize};

/// What a route needs. App capabilities are checked against the caller's role on that app.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[allow(missing_docs)]
pub enum Capability {
    ManageApps,
    ManagePrincipals,
    AppManageTriggers,
    AppDeadLetterManage,
    AppManageMembers,
    AppWriteKv,
    AppEnqueue,
    AppPublish,
    AppSendEmail,
    AppInvoke,
    AppRead,
    AppReadKv,
}

impl Capability {
    /// Every capability, for tests that walk them all.
    pub const ALL: [Capability; 12] = [
        Capability::ManageApps,
        Capability::ManagePrincipals,
        Capability::AppManageTriggers,
        Capability::AppDeadLetterManage,
        Capability::AppManageMembers,
        Capability::AppWriteKv,
        Capability::AppEnqueue,
        Capability::AppPublish,
        Capability::AppSendEmail,
        Capability::AppInvoke,
        Capability::AppRead,
        Capability::AppReadKv,
    ];

    /// The scope this capability maps to.
    pub fn scope(self) -> Scope {
        match self {
            Capability::ManageApps | Capability::ManagePrincipals => Scope::PlatformAdmin,
            Capability::AppManageTriggers
            | Capability::AppDeadLetterManage
            | Capability::AppManageMembers => Scope::AppAdmin,
            Capability::AppWriteKv | Capability::AppEnqueue => Scope::AppWrite,
            Capability::AppPublish => Scope::AppPublish,
            Capability::AppSendEmail => Scope::AppSend,
            Capability::AppInvoke => Scope::AppInvoke,
            Capability::AppRead | Capability::AppReadKv => Scope::AppRead,
        }
    }
}

/// The seven scopes; snake_case on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[allow(missing_docs)]
pub enum Scope {
    PlatformAdmin,
    AppAdmin,
    AppWrite,
    AppPublish,
    AppSend,
    AppInvoke,
    AppRead,
}

impl Scope {
    /// Every scope, in bit order.
    pub const ALL: [Scope; 7] = [
        Scope::PlatformAdmin,
        Scope::AppAdmin,
        Scope::AppWrite,
        Scope::AppPublish,
        Scope::AppSend,
        Scope::AppInvoke,
        Scope::AppRead,
    ];

    /// The wire name (`app_write`, …).
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::PlatformAdmin => "platform_admin",
            Scope::AppAdmin => "app_admin",
            Scope::AppWrite => "app_write",
            Scope::AppPublish => "app_publish",
            Scope::AppSend => "app_send",
            Scope::AppInvoke => "app_invoke",
            Scope::AppRead => "app_read",
        }
    }

    /// Parses a wire name.
    pub fn parse(s: &str) -> Option<Scope> {
        Scope::ALL.into_iter().find(|scope| scope.as_str() == s)
    }

    fn bit(self) -> u8 {
        1 << (self as u8)
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A principal's role on one app; snake_case on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[allow(missing_docs)]
pub enum Role {
    Viewer,
    Developer,
    Admin,
}

impl Role {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Developer => "developer",
            Role::Admin => "admin",
        }
    }

    /// Parses a wire name.
    pub fn parse(s: &str) -> Option<Role> {
        [Role::Viewer, Role::Developer, Role::Admin].into_iter().find(|r| r.as_str() == s)
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Whether a member with `role` on an app satisfies `scope` there (platform admins aside: they
/// satisfy every scope, see [`Access`]).
pub fn role_satisfies(role: Role, scope: Scope) -> bool {
    match scope {
        Scope::PlatformAdmin => false,
        Scope::AppAdmin => role == Role::Admin,
        Scope::AppWrite | Scope::AppPublish | Scope::AppSend | Scope::AppInvoke => {
            matches!(role, Role::Developer | Role::Admin)
        }
        Scope::AppRead => true,
    }
}

/// A set of scopes, as a token narrows them; compact enough to travel in a delivery token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct ScopeSet(u8);

impl ScopeSet {
    /// No scope at all.
    pub const EMPTY: ScopeSet = ScopeSet(0);
    /// All seven scopes.
    pub const ALL: ScopeSet = ScopeSet(0x7f);

    /// Whether `scope` is in the set.
    pub fn contains(self, scope: Scope) -> bool {
        self.0 & scope.bit() != 0
    }

    /// The set with `scope` added.
    pub fn with(self, scope: Scope) -> ScopeSet {
        ScopeSet(self.0 | scope.bit())
    }

    /// The scopes `role` satisfies on an app.
    pub fn for_role(role: Role) -> ScopeSet {
        Scope::ALL.into_iter().filter(|&s| role_satisfies(role, s)).collect()
    }

    /// The raw bits, for compact encodings.
    pub fn bits(self) -> u8 {
        self.0
    }

    /// A set from raw bits; unknown bits are dropped.
    pub fn from_bits(bits: u8) -> ScopeSet {
        ScopeSet(bits & Self::ALL.0)
    }

    /// The scopes in the set, in order.
    pub fn iter(self) -> impl Iterator<Item = Scope> {
        Scope::ALL.into_iter().filter(move |&s| self.contains(s))
    }

    /// The scopes common to both sets.
    pub fn intersect(self, other: ScopeSet) -> ScopeSet {
        ScopeSet(self.0 & other.0)
    }

    /// The set without the scopes a delivery token never carries: `app_admin` and
    /// `platform_admin` (DESIGN §9). A delivery token travels to code the platform does not
    /// control, so a handler may read, write, publish, enqueue, send and invoke on its app, but
    /// never manage its triggers, members, tokens or dead letters.
    pub fn for_delivery(self) -> ScopeSet {
        ScopeSet(self.0 & !(Scope::AppAdmin.bit() | Scope::PlatformAdmin.bit()))
    }
}

impl FromIterator<Scope> for ScopeSet {
    fn from_iter<I: IntoIterator<Item = Scope>>(iter: I) -> Self {
        iter.into_iter().fold(ScopeSet::EMPTY, ScopeSet::with)
    }
}

/// What a caller holds on one app: platform admin or not, its role there, and the scopes its
/// token narrows it to (`None`: not narrowed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Access {
    /// Platform admins satisfy every scope.
    pub platform_admin: bool,
    /// The caller's role on the app in question, if a member.
    pub role: Option<Role>,
    /// The token's scopes, when it was minted with some.
    pub token_scopes: Option<ScopeSet>,
}

impl Access {
    /// Whether this caller may exercise `capability` on the app.
    pub fn allows(&self, capability: Capability) -> bool {
        let scope = capability.scope();
        let by_standing = self.platform_admin || self.role.is_some_and(|r| role_satisfies(r, scope));
        by_standing && self.token_scopes.is_none_or(|s| s.contains(scope))
    }

    /// The scopes a delivery token for this caller carries: what it holds on the app, less
    /// `app_admin` and `platform_admin` ([`ScopeSet::for_delivery`]).
    pub fn delivery_scopes(&self) -> ScopeSet {
        let standing = if self.platform_admin {
            ScopeSet::for_role(Role::Admin)
        } else {
            self.role.map_or(ScopeSet::EMPTY, ScopeSet::for_role)
        };
        self.token_scopes.map_or(standing, |s| standing.intersect(s)).for_delivery()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delivery_scopes_cover_the_apps_data_but_never_its_administration_nor_the_platform() {
        let platform_admin = Access { platform_admin: true, role: None, token_scopes: None };
        let app_admin = Access { platform_admin: false, role: Some(Role::Admin), token_scopes: None };
        let expected: ScopeSet =
            [Scope::AppWrite, Scope::AppPublish, Scope::AppSend, Scope::AppInvoke, Scope::AppRead]
                .into_iter()
                .collect();
        assert_eq!(platform_admin.delivery_scopes(), expected);
        assert_eq!(app_admin.delivery_scopes(), expected);
        let narrowed = Access { token_scopes: Some(ScopeSet::EMPTY.with(Scope::AppRead)), ..app_admin };
        assert_eq!(narrowed.delivery_scopes(), ScopeSet::EMPTY.with(Scope::AppRead));
        assert_eq!(ScopeSet::ALL.for_delivery(), expected);
    }

    /// DESIGN §9, row by row: scope, its capabilities, and the roles that satisfy it.
    const TABLE: &[(Scope, &[Capability], &[Role])] = &[
        (Scope::PlatformAdmin, &[Capability::ManageApps, Capability::ManagePrincipals], &[]),
        (
            Scope::AppAdmin,
            &[Capability::AppManageTriggers, Capability::AppDeadLetterManage, Capability::AppManageMembers],
            &[Role::Admin],
        ),
        (Scope::AppWrite, &[Capability::AppWriteKv, Capability::AppEnqueue], &[Role::Developer, Role::Admin]),
        (Scope::AppPublish, &[Capability::AppPublish], &[Role::Developer, Role::Admin]),
        (Scope::AppSend, &[Capability::AppSendEmail], &[Role::Developer, Role::Admin]),
        (Scope::AppInvoke, &[Capability::AppInvoke], &[Role::Developer, Role::Admin]),
        (
            Scope::AppRead,
            &[Capability::AppRead, Capability::AppReadKv],
            &[Role::Viewer, Role::Developer, Role::Admin],
        ),
    ];

    #[test]
    fn every_row_of_the_scope_table_holds() {
        for (scope, capabilities, roles) in TABLE {
            for capability in *capabilities {
                assert_eq!(capability.scope(), *scope, "{capability:?}");
            }
            for role in [Role::Viewer, Role::Developer, Role::Admin] {
                assert_eq!(role_satisfies(role, *scope), roles.contains(&role), "{role:?} on {scope:?}");
            }
        }
        let listed: usize = TABLE.iter().map(|(_, caps, _)| caps.len()).sum();
        assert_eq!(listed, Capability::ALL.len(), "every capability appears in the table");
    }

    #[test]
    fn platform_admins_satisfy_every_scope_without_a_role() {
        let access = Access { platform_admin: true, role: None, token_scopes: None };
        assert!(Capability::ALL.iter().all(|&c| access.allows(c)));
    }

    #[test]
    fn a_non_member_is_allowed_nothing() {
        let access = Access { platform_admin: false, role: None, token_scopes: None };
        assert!(Capability::ALL.iter().all(|&c| !access.allows(c)));
    }

    #[test]
    fn token_scopes_narrow_but_never_widen_a_role() {
        let read_only = ScopeSet::EMPTY.with(Scope::AppRead);
        let admin_read_only =
            Access { platform_admin: false, role: Some(Role::Admin), token_scopes: Some(read_only) };
        assert!(admin_read_only.allows(Capability::AppReadKv));
        assert!(!admin_read_only.allows(Capability::AppWriteKv));

        let viewer_wide =
            Access { platform_admin: false, role: Some(Role::Viewer), token_scopes: Some(ScopeSet::ALL) };
        assert!(!viewer_wide.allows(Capability::AppWriteKv));
        assert_eq!(viewer_wide.delivery_scopes(), read_only);
    }

    #[test]
    fn scopes_and_roles_round_trip_their_wire_names() {
        for scope in Scope::ALL {
            assert_eq!(Scope::parse(scope.as_str()), Some(scope));
            assert_eq!(serde_json::to_string(&scope).unwrap(), format!("\"{scope}\""));
        }
        for role in [Role::Viewer, Role::Developer, Role::Admin] {
            assert_eq!(Role::parse(role.as_str()), Some(role));
        }
        assert_eq!(Scope::parse("root"), None);
    }

    #[test]
    fn scope_sets_round_trip_their_bits() {
        let set: ScopeSet = [Scope::AppRead, Scope::AppWrite].into_iter().collect();
        assert_eq!(ScopeSet::from_bits(set.bits()), set);
        assert_eq!(set.iter().collect::<Vec<_>>(), [Scope::AppWrite, Scope::AppRead]);
    }
}
