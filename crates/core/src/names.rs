//! Name newtypes, parsed once at the edge and trusted inside (app slugs, trigger and handler
//! names, collection, key, topic and queue names).

use std::fmt;

use serde::{Deserialize, Serialize};

/// Why a name was refused. The message names the rule, so an API can hand it to the caller.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {what} {value:?}: {rule}")]
pub struct NameError {
    /// What kind of name it was ("app slug", "trigger name", …).
    pub what: &'static str,
    /// The refused input, as given.
    pub value: String,
    /// The rule it broke, in words.
    pub rule: &'static str,
}

/// `[a-z][a-z0-9-]{0,62}` when `first_digit` is false, `[a-z0-9][a-z0-9_-]{0,62}` otherwise.
fn is_token(s: &str, slug: bool) -> bool {
    let bytes = s.as_bytes();
    let Some((&first, rest)) = bytes.split_first() else {
        return false;
    };
    let first_ok =
        if slug { first.is_ascii_lowercase() } else { first.is_ascii_lowercase() || first.is_ascii_digit() };
    first_ok
        && rest.len() <= 62
        && rest
            .iter()
            .all(|&b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || (!slug && b == b'_'))
}

/// 1–200 bytes of printable UTF-8 without `/` (collections, keys, topics, queues).
fn is_printable_name(s: &str) -> bool {
    !s.is_empty() && s.len() <= 200 && s.chars().all(|c| !c.is_control() && c != '/')
}

macro_rules! name_type {
    ($(#[$doc:meta])* $name:ident, $what:literal, $rule:literal, $check:expr) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
        #[serde(transparent)]
        pub struct $name(String);

        impl $name {
            /// Parses `value`, refusing it with a [`NameError`] that states the rule.
            pub fn parse(value: impl Into<String>) -> Result<Self, NameError> {
                let value = value.into();
                let check: fn(&str) -> bool = $check;
                if check(&value) {
                    Ok(Self(value))
                } else {
                    Err(NameError { what: $what, value, rule: $rule })
                }
            }

            /// The name as a string slice.
            pub fn as_str(&self) -> &str {
                &self.0
            }

            /// The name as an owned string.
            pub fn into_string(self) -> String {
                self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                Self::parse(s).map_err(serde::de::Error::custom)
            }
        }
    };
}

name_type!(
    /// An app's slug: `[a-z][a-z0-9-]{0,62}`, a valid NATS subject token by construction.
    AppSlug,
    "app slug",
    "expected 1-63 characters of a-z, 0-9 and '-', starting with a letter",
    |s| is_token(s, true)
);
name_type!(
    /// A trigger's name, unique within its app: `[a-z0-9][a-z0-9_-]{0,62}`.
    TriggerName,
    "trigger name",
    "expected 1-63 characters of a-z, 0-9, '_' and '-', starting with a letter or digit",
    |s| is_token(s, false)
);
name_type!(
    /// A function handler's name: `[a-z0-9][a-z0-9_-]{0,62}`, a valid NATS subject token.
    HandlerName,
    "handler name",
    "expected 1-63 characters of a-z, 0-9, '_' and '-', starting with a letter or digit",
    |s| is_token(s, false)
);
name_type!(
    /// A KV collection: 1–200 bytes of printable UTF-8 without `/`.
    CollectionName,
    "collection name",
    "expected 1-200 bytes of printable UTF-8 without '/'",
    is_printable_name
);
name_type!(
    /// A KV key: 1–200 bytes of printable UTF-8 without `/`.
    KvKey,
    "key",
    "expected 1-200 bytes of printable UTF-8 without '/'",
    is_printable_name
);
name_type!(
    /// A pubsub topic: 1–200 bytes of printable UTF-8 without `/`.
    TopicName,
    "topic name",
    "expected 1-200 bytes of printable UTF-8 without '/'",
    is_printable_name
);
name_type!(
    /// A job queue: 1–200 bytes of printable UTF-8 without `/`.
    QueueName,
    "queue name",
    "expected 1-200 bytes of printable UTF-8 without '/'",
    is_printable_name
);

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn app_slugs_start_with_a_letter_and_hold_lowercase_digits_and_dashes() {
        for ok in ["a", "shop", "my-app-2", &format!("a{}", "b".repeat(62))] {
            assert!(AppSlug::parse(ok).is_ok(), "{ok}");
        }
        for bad in ["", "1app", "-a", "Shop", "a_b", "a.b", "a b", &format!("a{}", "b".repeat(63))] {
            assert!(AppSlug::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn trigger_and_handler_names_may_start_with_a_digit_and_hold_underscores() {
        for ok in ["0", "on-order", "process_order", "9lives"] {
            assert!(TriggerName::parse(ok).is_ok(), "{ok}");
            assert!(HandlerName::parse(ok).is_ok(), "{ok}");
        }
        for bad in ["", "_x", "-x", "On", "a.b", "a*", "a>"] {
            assert!(TriggerName::parse(bad).is_err(), "{bad}");
            assert!(HandlerName::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn printable_names_refuse_slashes_control_characters_and_over_200_bytes() {
        for ok in ["orders:eu", "tmp_1", "ünïcode ok", "a*b", &"x".repeat(200)] {
            assert!(CollectionName::parse(ok).is_ok(), "{ok}");
            assert!(KvKey::parse(ok).is_ok(), "{ok}");
        }
        for bad in ["", "a/b", "tab\there", "nl\n", &"x".repeat(201), &"é".repeat(101)] {
            assert!(CollectionName::parse(bad).is_err(), "{bad:?}");
            assert!(TopicName::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_name_error_states_what_was_refused_and_the_rule() {
        let err = AppSlug::parse("Bad Slug").unwrap_err();
        let text = err.to_string();
        assert!(text.contains("app slug"), "{text}");
        assert!(text.contains("\"Bad Slug\""), "{text}");
        assert!(text.contains("starting with a letter"), "{text}");
    }

    #[test]
    fn names_deserialize_through_parse() {
        let ok: AppSlug = serde_json::from_str("\"shop\"").unwrap();
        assert_eq!(ok.as_str(), "shop");
        assert!(serde_json::from_str::<AppSlug>("\"Shop\"").is_err());
    }

    proptest! {
        #[test]
        fn every_valid_handler_name_is_a_single_nats_subject_token(name in "[a-z0-9][a-z0-9_-]{0,62}") {
            let parsed = HandlerName::parse(name).unwrap();
            prop_assert!(!parsed.as_str().contains(['.', '*', '>', ' ']));
        }

        #[test]
        fn parsing_any_text_never_panics_and_every_name_that_parses_round_trips(
            s in prop_oneof![any::<String>(), "[a-z0-9_-]{0,70}", "[^/]{0,210}"],
        ) {
            fn round_trips<N>(parsed: Result<N, NameError>, s: &str) -> Result<(), TestCaseError>
            where
                N: AsRef<str> + fmt::Display + fmt::Debug + PartialEq,
                N: Serialize + serde::de::DeserializeOwned,
            {
                match parsed {
                    Ok(name) => {
                        prop_assert_eq!(name.as_ref(), s);
                        prop_assert_eq!(name.to_string(), s);
                        let json = serde_json::to_string(&name).unwrap();
                        prop_assert_eq!(serde_json::from_str::<N>(&json).unwrap(), name);
                    }
                    Err(e) => {
                        prop_assert_eq!(e.value, s);
                        prop_assert!(!e.rule.is_empty());
                    }
                }
                Ok(())
            }
            round_trips(AppSlug::parse(s.clone()), &s)?;
            round_trips(TriggerName::parse(s.clone()), &s)?;
            round_trips(HandlerName::parse(s.clone()), &s)?;
            round_trips(CollectionName::parse(s.clone()), &s)?;
            round_trips(KvKey::parse(s.clone()), &s)?;
            round_trips(TopicName::parse(s.clone()), &s)?;
            round_trips(QueueName::parse(s.clone()), &s)?;
        }

        #[test]
        fn slugs_and_trigger_names_are_accepted_exactly_when_their_grammar_holds(
            s in prop_oneof![any::<String>(), "[a-z0-9_A-Z.-]{0,70}"],
        ) {
            let rest_ok = |underscore: bool| {
                s.chars().count() <= 63
                    && s.chars().skip(1).all(|c| {
                        matches!(c, 'a'..='z' | '0'..='9' | '-') || (underscore && c == '_')
                    })
            };
            let slug = matches!(s.chars().next(), Some('a'..='z')) && rest_ok(false);
            let trigger = matches!(s.chars().next(), Some('a'..='z' | '0'..='9')) && rest_ok(true);
            prop_assert_eq!(AppSlug::parse(s.clone()).is_ok(), slug);
            prop_assert_eq!(TriggerName::parse(s.clone()).is_ok(), trigger);
            prop_assert_eq!(HandlerName::parse(s.clone()).is_ok(), trigger);
        }

        #[test]
        fn printable_names_are_accepted_exactly_when_the_rule_holds(s in "\\PC{0,60}") {
            let expected = !s.is_empty() && s.len() <= 200 && !s.contains('/') && !s.chars().any(char::is_control);
            prop_assert_eq!(CollectionName::parse(s).is_ok(), expected);
        }
    }
}
