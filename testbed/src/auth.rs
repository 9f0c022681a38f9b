//! Authentication: API tokens, tickets (`PVEAuthCookie`) and CSRF prevention tokens.

use std::collections::HashMap;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD};
use sha2::{Digest, Sha256};

use crate::error::ApiError;

/// Ticket lifetime (pve-access-control `$ticket_lifetime = 3600*2`).
pub const TICKET_LIFETIME_SECS: u64 = 2 * 3600;

/// Who made a call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    /// A user logged in with a ticket.
    User(String),
    /// An API token of a user.
    Token {
        /// `user@realm`.
        user: String,
        /// The token id.
        tokenid: String,
    },
}

impl Principal {
    /// The user as it appears in UPIDs: `user@realm` or `user@realm!tokenid`.
    pub fn upid_user(&self) -> String {
        match self {
            Self::User(u) => u.clone(),
            Self::Token { user, tokenid } => format!("{user}!{tokenid}"),
        }
    }

    /// Whether this is `root@pam` itself (not one of its tokens): only it may use `skiplock`.
    pub fn is_root(&self) -> bool {
        matches!(self, Self::User(u) if u == "root@pam")
    }
}

/// A successful login.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Login {
    /// `user@realm`.
    pub username: String,
    /// The `PVEAuthCookie` value.
    pub ticket: String,
    /// The `CSRFPreventionToken` header value.
    pub csrf: String,
}

/// The credentials the simulated cluster accepts.
#[derive(Debug, Clone)]
pub struct Auth {
    tokens: HashMap<String, String>,
    users: HashMap<String, String>,
    secret: [u8; 32],
}

impl Auth {
    /// Credentials from `(user@realm!tokenid, secret)` and `(user@realm, password)` pairs.
    pub fn new(tokens: &[(String, String)], users: &[(String, String)], secret: [u8; 32]) -> Self {
        Self {
            tokens: tokens.iter().cloned().collect(),
            users: users.iter().cloned().collect(),
            secret,
        }
    }

    /// Authenticates a request from its `Authorization`, `Cookie` and `CSRFPreventionToken` headers.
    /// The error is a 401 with the auth handler's reason phrases.
    pub fn authenticate(
        &self,
        method: &str,
        authorization: Option<&str>,
        cookie: Option<&str>,
        csrf: Option<&str>,
    ) -> Result<Principal, ApiError> {
        if let Some(value) = authorization.and_then(|a| a.strip_prefix("PVEAPIToken")) {
            let value = value
                .strip_prefix('=')
                .or_else(|| value.strip_prefix(' '))
                .unwrap_or(value);
            return self.check_token(value.trim());
        }
        let ticket = cookie
            .and_then(|c| {
                c.split(';')
                    .filter_map(|kv| kv.trim().split_once('='))
                    .find(|(k, _)| *k == "PVEAuthCookie")
            })
            .map(|(_, v)| v)
            .or_else(|| authorization.and_then(|a| a.strip_prefix("PVEAuthCookie=")))
            .ok_or_else(|| ApiError::unauthorized("No ticket"))?;
        let ticket = crate::formats::uri_unescape(ticket);
        let user = self
            .verify_ticket(&ticket)
            .ok_or_else(|| ApiError::unauthorized("Authentication failed!"))?;
        if method != "GET" && !csrf.is_some_and(|token| self.verify_csrf(token, &user)) {
            return Err(ApiError::unauthorized("Permission denied - invalid csrf token"));
        }
        Ok(Principal::User(user))
    }

    fn check_token(&self, value: &str) -> Result<Principal, ApiError> {
        let failed = || ApiError::unauthorized("Authentication failed!");
        let (id, secret) = value.rsplit_once('=').ok_or_else(failed)?;
        let (user, tokenid) = id.split_once('!').ok_or_else(failed)?;
        match self.tokens.get(id) {
            Some(expected) if expected == secret => Ok(Principal::Token {
                user: user.to_string(),
                tokenid: tokenid.to_string(),
            }),
            _ => Err(failed()),
        }
    }

    /// `POST /access/ticket`: a password login, or a renewal with a valid ticket as the password.
    pub fn login(&self, username: &str, password: &str, realm: Option<&str>) -> Result<Login, ApiError> {
        let failure = || ApiError::unauthorized("authentication failure");
        let username = match (username.contains('@'), realm) {
            (true, _) => username.to_string(),
            (false, Some(realm)) => format!("{username}@{realm}"),
            (false, None) => return Err(failure()),
        };
        let by_password = self.users.get(&username).is_some_and(|p| p == password);
        let by_ticket =
            password.starts_with("PVE:") && self.verify_ticket(password).as_deref() == Some(&username);
        if !(by_password || by_ticket) {
            return Err(failure());
        }
        let time = format!("{:08X}", now());
        let ticket = format!(
            "PVE:{username}:{time}::{}",
            STANDARD.encode(self.mac(&["ticket", &username, &time]))
        );
        let csrf = format!(
            "{time}:{}",
            STANDARD_NO_PAD.encode(self.mac(&["csrf", &username, &time]))
        );
        Ok(Login {
            username,
            ticket,
            csrf,
        })
    }

    fn verify_ticket(&self, ticket: &str) -> Option<String> {
        let rest = ticket.strip_prefix("PVE:")?;
        let (payload, signature) = rest.split_once("::")?;
        let (user, time) = payload.rsplit_once(':')?;
        let issued = u64::from_str_radix(time, 16).ok()?;
        let expected = STANDARD.encode(self.mac(&["ticket", user, time]));
        let fresh = now().saturating_sub(issued) < TICKET_LIFETIME_SECS && issued <= now() + 300;
        (signature == expected && fresh).then(|| user.to_string())
    }

    fn verify_csrf(&self, token: &str, user: &str) -> bool {
        token.split_once(':').is_some_and(|(time, sig)| {
            let fresh =
                u64::from_str_radix(time, 16).is_ok_and(|t| now().saturating_sub(t) < TICKET_LIFETIME_SECS);
            fresh && sig == STANDARD_NO_PAD.encode(self.mac(&["csrf", user, time]))
        })
    }

    fn mac(&self, parts: &[&str]) -> [u8; 32] {
        let mut hasher = Sha256::new();
        hasher.update(self.secret);
        for part in parts {
            hasher.update(part.as_bytes());
            hasher.update([0]);
        }
        hasher.finalize().into()
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth() -> Auth {
        Auth::new(
            &[("ci@pve!ctl".into(), "s3cret".into())],
            &[("root@pam".into(), "pw".into())],
            [7; 32],
        )
    }

    #[test]
    fn a_token_authenticates_and_carries_its_id() {
        let p = auth()
            .authenticate("POST", Some("PVEAPIToken=ci@pve!ctl=s3cret"), None, None)
            .unwrap();
        assert_eq!(p.upid_user(), "ci@pve!ctl");
        let e = auth()
            .authenticate("GET", Some("PVEAPIToken=ci@pve!ctl=wrong"), None, None)
            .unwrap_err();
        assert_eq!((e.status, e.message.as_str()), (401, "Authentication failed!"));
    }

    #[test]
    fn a_ticket_needs_the_csrf_token_on_writes_only() {
        let a = auth();
        let login = a.login("root", "pw", Some("pam")).unwrap();
        let cookie = format!("PVEAuthCookie={}", login.ticket);
        assert!(a.authenticate("GET", None, Some(&cookie), None).is_ok());
        let e = a.authenticate("POST", None, Some(&cookie), None).unwrap_err();
        assert_eq!(e.message, "Permission denied - invalid csrf token");
        assert!(
            a.authenticate("POST", None, Some(&cookie), Some(&login.csrf))
                .is_ok()
        );
    }

    #[test]
    fn a_valid_ticket_renews_itself_as_the_password() {
        let a = auth();
        let login = a.login("root@pam", "pw", None).unwrap();
        assert!(a.login("root@pam", &login.ticket, None).is_ok());
        assert_eq!(
            a.login("root@pam", "nope", None).unwrap_err().message,
            "authentication failure"
        );
    }
}
