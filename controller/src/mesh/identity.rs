//! The coordinator's identity side: users and their roles and credentials,
//! API-key callers, and nodes enrolled (or re-authenticated) by a person who
//! signed in. Same rules as the rest of [`Mesh`]: the store first, then the
//! core, then publication; every change audited; time and randomness come in
//! as arguments.

use rand_core::RngCore;
use ztmesh_proto::control as pb;

use super::{dns_label, validate_login, Mesh};
use crate::accounts;
use crate::error::{Error, Result};
pub use crate::model::DeviceClaim;
use crate::netcore::Change;
use crate::roles::Role;
use crate::secrets::{self, KeyDetail, Presented, Refusal, SecretKind};
use crate::store::{Credentials, NewNode, NodeRow, UserRow};
use crate::UnixMs;

/// Who makes an admin call, and what they may do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Actor {
    /// As written in the audit log: `local-admin`, `api-key:ID`, `user:LOGIN`.
    pub name: String,
    pub role: Role,
}

impl Actor {
    /// The admin socket: root on the controller's machine.
    pub fn local() -> Self {
        Self {
            name: "local-admin".into(),
            role: Role::Admin,
        }
    }

    /// A person signed in to the web pages.
    pub fn user(login: &str, role: Role) -> Self {
        Self {
            name: format!("user:{login}"),
            role,
        }
    }
}

/// An admin's change to a user; `None`/`false` fields stay as they are.
#[derive(Clone, Debug, Default)]
pub struct UserUpdate {
    pub role: Option<Role>,
    /// `Some(None)`: back to the controller's default; `Some(Some(0))`: never.
    pub key_expiry_ms: Option<Option<UnixMs>>,
    /// `Some(None)` removes the password.
    pub password: Option<Option<String>>,
    pub reset_mfa: bool,
    pub unlink_sso: bool,
}

/// What confirming a device did.
#[derive(Clone, Debug)]
pub struct DeviceEnrolled {
    pub response: pb::EnrollResponse,
    pub node: NodeRow,
    /// An existing node signed in again (same id and addresses).
    pub reauth: bool,
}

/// The longest a key lifetime may be set to (10 years).
const MAX_KEY_TTL_MS: i64 = 10 * 365 * 24 * 3600 * 1000;

impl Mesh {
    /// The role an API key grants.
    ///
    /// # Errors
    /// `Unauthenticated` naming the [`Refusal`]: malformed, unknown (or a
    /// wrong secret), revoked, expired.
    pub fn check_api_key(&self, text: &str, now: UnixMs) -> Result<Actor> {
        let kind = SecretKind::ApiKey;
        let refused = |r: Refusal| Error::Unauthenticated(r.message(kind));
        let presented = Presented::parse(kind, text).map_err(refused)?;
        let record = self.store.find_key(kind, presented.key_id())?;
        secrets::verify(&presented, record.as_ref(), now).map_err(refused)?;
        let role = match record.map(|r| r.detail) {
            Some(KeyDetail::Api { role, .. }) => role,
            _ => return Err(refused(Refusal::Unknown)),
        };
        Ok(Actor {
            name: format!("{}:{}", kind.audit_name(), presented.key_id()),
            role,
        })
    }

    pub fn create_user(
        &self,
        actor: &str,
        login: &str,
        role: Role,
        now: UnixMs,
    ) -> Result<UserRow> {
        validate_login(login)?;
        if login.bytes().any(|b| b.is_ascii_uppercase()) {
            // Sign-in compares lowercased logins and emails: a mixed-case
            // login could never sign in, and its lowercase twin could.
            return Err(Error::Invalid(format!(
                "invalid user login {login:?}: logins are lowercase ({:?})",
                login.to_ascii_lowercase()
            )));
        }
        let row = self.store.create_user(login, role, now)?;
        self.audit(now, actor, "user.create", login, &format!("role={role}"));
        Ok(row)
    }

    pub fn user(&self, login: &str) -> Result<UserRow> {
        self.store
            .users()?
            .into_iter()
            .find(|u| u.login == login)
            .ok_or_else(|| Error::NotFound(format!("user {login}")))
    }

    /// Applies an admin's [`UserUpdate`] (audited; the password never is).
    ///
    /// # Errors
    /// `NotFound`; `Invalid` for a weak password or a lifetime out of range.
    pub fn update_user(
        &self,
        actor: &str,
        login: &str,
        update: &UserUpdate,
        rng: &mut impl RngCore,
        now: UnixMs,
    ) -> Result<UserRow> {
        self.user(login)?;
        let mut did = Vec::new();
        if let Some(Some(ms)) = update.key_expiry_ms {
            if !(0..=MAX_KEY_TTL_MS).contains(&ms) {
                return Err(Error::Invalid(
                    "key expiry must be between 0 (never) and 10 years".into(),
                ));
            }
        }
        let hash = match &update.password {
            Some(Some(pw)) => {
                accounts::check_new_password(pw).map_err(|e| Error::Invalid(e.to_string()))?;
                Some(Some(accounts::hash_password(pw, rng)))
            }
            Some(None) => Some(None),
            None => None,
        };
        if let Some(role) = update.role {
            self.store.set_user_role(login, role)?;
            did.push(format!("role={role}"));
        }
        if let Some(ttl) = update.key_expiry_ms {
            self.store.set_user_key_expiry(login, ttl)?;
            did.push(match ttl {
                None => "key-expiry=default".to_string(),
                Some(0) => "key-expiry=never".to_string(),
                Some(ms) => format!("key-expiry={}s", ms / 1000),
            });
        }
        if let Some(h) = hash {
            self.store.set_password(login, h.as_deref())?;
            did.push(
                if h.is_some() {
                    "password=set"
                } else {
                    "password=removed"
                }
                .into(),
            );
        }
        if update.reset_mfa {
            self.store.set_totp(login, None, &[], 0)?;
            did.push("mfa=reset".into());
        }
        if update.unlink_sso {
            let n = self.store.unlink_identities(login)?;
            did.push(format!("sso-unlinked={n}"));
        }
        self.audit(now, actor, "user.update", login, &did.join(" "));
        self.user(login)
    }

    /// A built-in account's credentials (for the sign-in pages).
    pub fn credentials(&self, login: &str) -> Result<Option<Credentials>> {
        Ok(self.store.credentials(login)?)
    }

    /// Checks a TOTP code (or a recovery code, when `code` is not 6 digits)
    /// and records it used, so it never works again.
    pub fn use_second_factor(&self, login: &str, code: &str, now: UnixMs) -> Result<bool> {
        let Some(c) = self.store.credentials(login)? else {
            return Ok(false);
        };
        let Some(secret) = &c.totp_secret else {
            return Ok(false);
        };
        if let Some(step) = accounts::check_totp(secret, code, now, c.totp_last_step) {
            return Ok(self.store.use_totp_step(login, step)?);
        }
        if let Some(i) = accounts::match_recovery_code(code, &c.recovery) {
            let used = self.store.use_recovery_code(login, &c.recovery[i])?;
            if used {
                self.audit(
                    now,
                    &format!("user:{login}"),
                    "mfa.recovery-code",
                    login,
                    &format!("{} left", c.recovery.len() - 1),
                );
            }
            return Ok(used);
        }
        Ok(false)
    }

    /// Enrols a TOTP factor after the person proved they hold it (`step`
    /// is the step of the code they typed, recorded used); returns the
    /// recovery codes, to be shown once.
    ///
    /// # Errors
    /// `Conflict` when a factor was enrolled meanwhile (never overwritten
    /// here: only an admin's `--reset-mfa` removes one).
    pub fn enroll_totp(
        &self,
        login: &str,
        secret: &[u8],
        step: i64,
        rng: &mut impl RngCore,
        now: UnixMs,
    ) -> Result<Vec<String>> {
        let (codes, hashes) = accounts::new_recovery_codes(rng);
        if !self.store.enroll_totp(login, secret, &hashes, step)? {
            return Err(Error::Conflict("a second factor for this account".into()));
        }
        self.audit(now, &format!("user:{login}"), "mfa.enroll", login, "totp");
        Ok(codes)
    }

    /// A digest of what a signed-in browser session rests on: the user's
    /// id, role, password hash and second factor. A session made before any
    /// of them changed (password reset, MFA reset, role change, the user
    /// deleted and made again) no longer matches and is signed out.
    pub fn credential_stamp(&self, login: &str) -> Option<[u8; 32]> {
        let user = self.user(login).ok()?;
        let creds = self.store.credentials(login).ok()??;
        let mut m = Vec::new();
        m.extend_from_slice(&user.id.to_be_bytes());
        m.extend_from_slice(user.role.as_str().as_bytes());
        m.push(0);
        m.extend_from_slice(creds.password_hash.as_deref().unwrap_or("").as_bytes());
        m.push(0);
        m.extend_from_slice(creds.totp_secret.as_deref().unwrap_or(&[]));
        for (issuer, subject) in self.store.identities(login).ok()? {
            m.push(0);
            m.extend_from_slice(issuer.as_bytes());
            m.push(0);
            m.extend_from_slice(subject.as_bytes());
        }
        Some(ztmesh_proto::auth::sha256(&m))
    }

    /// Writes an audit row for the sign-in pages.
    pub fn audit_event(&self, now: UnixMs, actor: &str, action: &str, target: &str, detail: &str) {
        self.audit(now, actor, action, target, detail);
    }

    /// The user an SSO identity is linked to, linking it the first time:
    /// an existing user whose login is the verified email, or a new member
    /// when `create` allows (the provider's allowed domains vouch for it).
    ///
    /// # Errors
    /// `Forbidden` when nothing links it; store failures.
    pub fn sso_user(
        &self,
        issuer: &str,
        subject: &str,
        email: Option<&str>,
        create: bool,
        now: UnixMs,
    ) -> Result<UserRow> {
        if let Some(login) = self.store.identity_login(issuer, subject)? {
            return self.user(&login);
        }
        let email = email.ok_or_else(|| {
            Error::Forbidden(
                "your identity provider did not send a verified email address, so this account \
                 cannot be matched to a ztmesh user; ask an admin"
                    .into(),
            )
        })?;
        let login = email.to_ascii_lowercase();
        validate_login(&login).map_err(|_| {
            Error::Forbidden(format!("{login:?} cannot be a ztmesh login; ask an admin"))
        })?;
        let user = match self.user(&login) {
            // A built-in account is never taken over by a provider that
            // vouches for the same address: an admin opts it in to SSO by
            // removing its password.
            Ok(u) if u.has_password => {
                return Err(Error::Forbidden(format!(
                    "{login} signs in with its built-in password here, not with single sign-on; \
                     ask an admin (`users update {login} --clear-password` allows SSO)"
                )))
            }
            Ok(u) => u,
            Err(Error::NotFound(_)) if create => {
                self.create_user("sso", &login, Role::Member, now)?
            }
            Err(Error::NotFound(_)) => {
                return Err(Error::Forbidden(format!(
                    "no ztmesh user {login}; ask an admin to add you"
                )))
            }
            Err(e) => return Err(e),
        };
        self.store.link_identity(issuer, subject, &login, now)?;
        self.audit(
            now,
            "sso",
            "user.link-identity",
            &login,
            &format!("issuer={issuer} subject={subject}"),
        );
        Ok(user)
    }

    /// The key lifetime of a node owned by `user`, or else by `tags` (0 =
    /// never): the user's own lifetime or the default; for tags, the
    /// shortest of their overrides (a tag that never expires counts as
    /// longest), or the tagged default.
    pub fn key_ttl(&self, user: Option<&UserRow>, tags: &[String]) -> i64 {
        if let Some(u) = user {
            return u.key_expiry_ms.unwrap_or(self.cfg.node_key_ttl_ms);
        }
        tags.iter()
            .filter_map(|t| self.cfg.tag_key_ttl_ms.get(t).copied())
            .min_by_key(|ttl| if *ttl == 0 { i64::MAX } else { *ttl })
            .unwrap_or(self.cfg.tagged_key_ttl_ms)
    }

    /// `now + ttl`, or 0 (never) for a zero lifetime.
    pub(super) fn expiry_at(ttl: i64, now: UnixMs) -> UnixMs {
        if ttl > 0 {
            now.saturating_add(ttl)
        } else {
            0
        }
    }

    /// A person confirmed a device: enrolls it as theirs, or re-authenticates
    /// it when this machine key is already their node (same id, name and
    /// addresses; a new key expiry).
    ///
    /// # Errors
    /// `Forbidden` when the machine key belongs to another owner, `Conflict`
    /// when the WireGuard key differs from the enrolled node's or is taken;
    /// `NotFound` for an unknown user.
    pub fn enroll_device(
        &self,
        login: &str,
        claim: &DeviceClaim,
        now: UnixMs,
    ) -> Result<DeviceEnrolled> {
        let user = self.user(login)?;
        let expiry = Self::expiry_at(self.key_ttl(Some(&user), &[]), now);
        let actor = format!("user:{login}");
        let turn = self.turn();
        let mut attempt = 0;
        let row = loop {
            // As `enroll`: nodes another controller enrolled meanwhile hold
            // their names and addresses; a lost race looks again.
            self.fresh(&turn, now);
            attempt += 1;
            let existing = self
                .state()
                .core
                .nodes()
                .by_machine_key(&claim.machine_key)
                .cloned();
            if let Some(node) = existing {
                if node.user.as_deref() != Some(login) {
                    return Err(Error::Forbidden(
                        "this device is enrolled to another owner; its owner must sign in, or an \
                     admin must delete it first"
                            .into(),
                    ));
                }
                if node.wg_key != claim.wg_key {
                    return Err(Error::Conflict(
                        "a node with this machine key and a different WireGuard key".into(),
                    ));
                }
                let node = self.reauthenticate(&turn, &actor, node, expiry, now)?;
                return Ok(DeviceEnrolled {
                    response: self.enroll_response(&node),
                    node,
                    reauth: true,
                });
            }
            let (name, (ipv4, ipv6)) = {
                let mut st = self.state();
                let name = st.core.nodes().unique_name(&dns_label(&claim.hostname));
                let addresses = st
                    .core
                    .allocate(self.ula)
                    .map_err(|_| Error::Invalid("overlay IPv4 range exhausted".into()))?;
                (name, addresses)
            };
            match self.store.enroll_for_user(
                login,
                NewNode {
                    name,
                    hostname: claim.hostname.clone(),
                    machine_key: claim.machine_key,
                    wg_key: claim.wg_key,
                    ipv4,
                    ipv6,
                    created_ms: now,
                    expiry_ms: expiry,
                },
            ) {
                Err(crate::store::StoreError::Conflict(why))
                    if attempt < super::ENROLL_ATTEMPTS =>
                {
                    tracing::info!(
                        why,
                        attempt,
                        "enrollment raced another controller; retrying"
                    );
                }
                r => break r?,
            }
        };
        self.audit(
            now,
            &actor,
            "node.enroll",
            &row.name,
            &format!(
                "id={} ipv4={} ipv6={} via=login",
                row.id, row.ipv4, row.ipv6
            ),
        );
        tracing::info!(node = %row.name, id = row.id, user = login, "node enrolled by login");
        self.apply(&turn, Change::Upsert(row.clone()), now);
        Ok(DeviceEnrolled {
            response: self.enroll_response(&row),
            node: row,
            reauth: false,
        })
    }

    /// Gives an enrolled node a new key expiry (and lifts an admin's
    /// expiry): store, audit, core.
    pub(super) fn reauthenticate(
        &self,
        turn: &super::Turn<'_>,
        actor: &str,
        node: NodeRow,
        expiry_ms: UnixMs,
        now: UnixMs,
    ) -> Result<NodeRow> {
        self.store.reauth_node(node.id, expiry_ms)?;
        self.audit(
            now,
            actor,
            "node.reauth",
            &node.name,
            &format!("id={} expires_ms={expiry_ms}", node.id),
        );
        let node = NodeRow {
            expiry_ms,
            key_revoked: false,
            ..node
        };
        self.apply(turn, Change::Upsert(node.clone()), now);
        Ok(node)
    }

    pub(super) fn enroll_response(&self, row: &NodeRow) -> pb::EnrollResponse {
        pb::EnrollResponse {
            node_id: row.id,
            name: row.name.clone(),
            addresses: vec![row.ipv4.to_string(), row.ipv6.to_string()],
            controller_key: self.controller_key().as_bytes().to_vec(),
            key_expiry_ms: row.expiry_ms,
        }
    }
}
