//! Who may do what on the admin side: users, API keys and web sessions carry
//! a [`Role`]; every admin call names the [`Access`] it needs. Pure.
//!
//! | role            | read everything | nodes, routes, policy, auth keys | users, roles, API keys |
//! |-----------------|-----------------|----------------------------------|------------------------|
//! | `admin`         | yes             | yes                              | yes                    |
//! | `network-admin` | yes             | yes                              | no                     |
//! | `auditor`       | yes             | no                               | no                     |
//! | `member`        | no              | no                               | no                     |
//!
//! A member signs in to enroll and re-authenticate their own devices; the
//! admin socket (root only) acts as `admin`.

use std::fmt;
use std::str::FromStr;

/// A role, from the most to the least privileged.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Role {
    Admin,
    NetworkAdmin,
    Auditor,
    Member,
}

/// What an admin call needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// Reading state: nodes, users, keys (never their secrets), policy, audit.
    Read,
    /// Changing the network: nodes, routes, policy, auth keys.
    Network,
    /// Changing who may administer: users, roles, API keys; and taking
    /// backups (they hold the netmap signing key).
    Identity,
}

impl Role {
    pub const ALL: [Role; 4] = [Role::Admin, Role::NetworkAdmin, Role::Auditor, Role::Member];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::NetworkAdmin => "network-admin",
            Role::Auditor => "auditor",
            Role::Member => "member",
        }
    }

    /// Whether this role may make a call needing `access`.
    pub fn allows(self, access: Access) -> bool {
        matches!(
            (self, access),
            (Role::Admin, _)
                | (Role::NetworkAdmin, Access::Read | Access::Network)
                | (Role::Auditor, Access::Read)
        )
    }

    /// Whether a holder of this role may hand out `other` (to a user or an
    /// API key): never more than it holds.
    pub fn may_grant(self, other: Role) -> bool {
        self.allows(Access::Identity) && self <= other
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A role name that is not one of [`Role::ALL`].
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("unknown role {0:?}: expected admin, network-admin, auditor or member")]
pub struct UnknownRole(pub String);

impl FromStr for Role {
    type Err = UnknownRole;
    fn from_str(s: &str) -> Result<Self, UnknownRole> {
        Role::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| UnknownRole(s.chars().take(40).collect()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_in_the_module_doc_holds() {
        use Access::*;
        let table = [
            (Role::Admin, [true, true, true]),
            (Role::NetworkAdmin, [true, true, false]),
            (Role::Auditor, [true, false, false]),
            (Role::Member, [false, false, false]),
        ];
        for (role, row) in table {
            for (access, want) in [Read, Network, Identity].into_iter().zip(row) {
                assert_eq!(role.allows(access), want, "{role} {access:?}");
            }
        }
    }

    #[test]
    fn names_round_trip_and_unknown_names_are_refused() {
        for r in Role::ALL {
            assert_eq!(r.as_str().parse::<Role>(), Ok(r));
        }
        assert!("Admin".parse::<Role>().is_err());
        assert!("root".parse::<Role>().is_err());
        let long = "x".repeat(10_000).parse::<Role>().unwrap_err();
        assert!(long.to_string().len() < 120, "the message stays short");
    }

    #[test]
    fn only_admins_grant_and_never_above_themselves() {
        assert!(Role::Admin.may_grant(Role::Admin));
        assert!(Role::Admin.may_grant(Role::Auditor));
        assert!(!Role::NetworkAdmin.may_grant(Role::Member));
        assert!(!Role::Auditor.may_grant(Role::Auditor));
    }
}
