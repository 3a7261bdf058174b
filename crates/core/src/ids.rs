//! Id newtypes of the records other records point at (apps, principals, triggers).
//!
//! Each wraps a `Uuid` and is nothing more, but the compiler tells them apart: an app id cannot
//! be passed where a principal id is expected, and a signature such as
//! `set_role(app_id: AppId, principal_id: PrincipalId, …)` cannot be called with its arguments
//! swapped. They display, parse and serialize exactly as the UUID they wrap, so the JSON and the
//! database columns stay plain UUIDs; conversion to and from `Uuid` is explicit
//! ([`AppId::from_uuid`], [`AppId::as_uuid`]) and belongs at those edges.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// What the id types share, for the edges that read or write any of them (a column, a token):
/// there is no `From<Uuid>`, so a UUID becomes an id only where one of these is named, and one
/// kind of id never becomes another through `.into()`.
pub trait Id: Copy {
    /// The id held by `uuid`.
    fn from_uuid(uuid: Uuid) -> Self;
    /// The UUID it holds.
    fn as_uuid(self) -> Uuid;
}

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(Uuid);

        // No `Default`: a default id would be a fresh random one, which a derived `Default` of a
        // record would hide.
        #[allow(clippy::new_without_default)]
        impl $name {
            /// A fresh id: a version 7 UUID, ordered by creation time.
            pub fn new() -> Self {
                Self(Uuid::now_v7())
            }

            /// The id held by `uuid` (read from a column, a token or a path).
            pub const fn from_uuid(uuid: Uuid) -> Self {
                Self(uuid)
            }

            /// The UUID, for the edges that store or send it.
            pub const fn as_uuid(self) -> Uuid {
                self.0
            }
        }

        impl Id for $name {
            fn from_uuid(uuid: Uuid) -> Self {
                Self(uuid)
            }

            fn as_uuid(self) -> Uuid {
                self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Display::fmt(&self.0, f)
            }
        }

        impl FromStr for $name {
            type Err = uuid::Error;

            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Uuid::from_str(s).map(Self)
            }
        }
    };
}

id_type!(
    /// An app's id.
    AppId
);
id_type!(
    /// A principal's id (a user or service identity).
    PrincipalId
);

impl PrincipalId {
    /// The id of no principal of the database: who the node's operator (`admin`, `dev`) acts as
    /// when an operation records no one.
    pub const NOBODY: PrincipalId = PrincipalId(Uuid::nil());
}
id_type!(
    /// A trigger's id.
    TriggerId
);

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn fresh_ids_are_distinct_and_ordered_by_creation() {
        let first = TriggerId::new();
        let second = TriggerId::new();
        assert_ne!(first, second);
        assert!(first < second, "v7 ids sort by their creation time");
    }

    #[test]
    fn an_id_serializes_as_the_bare_uuid_string() {
        let uuid = Uuid::from_u128(0x0190_0000_0000_7000_8000_0000_0000_0001);
        let id = PrincipalId::from_uuid(uuid);
        assert_eq!(serde_json::to_value(id).unwrap(), serde_json::json!(uuid.to_string()));
        assert_eq!(serde_json::from_value::<PrincipalId>(serde_json::json!(uuid)).unwrap(), id);
    }

    #[test]
    fn text_that_is_no_uuid_is_refused() {
        assert!("not-a-uuid".parse::<AppId>().is_err());
        assert!(serde_json::from_value::<AppId>(serde_json::json!("app")).is_err());
    }

    proptest! {
        #[test]
        fn display_and_parse_round_trip_as_the_uuid(bits in any::<u128>()) {
            let uuid = Uuid::from_u128(bits);
            let id = AppId::from_uuid(uuid);
            prop_assert_eq!(id.to_string(), uuid.to_string());
            prop_assert_eq!(id.to_string().parse::<AppId>().unwrap(), id);
            prop_assert_eq!(id.as_uuid(), uuid);
        }
    }
}
