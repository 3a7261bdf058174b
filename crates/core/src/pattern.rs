//! Collection and topic patterns (`*`, `prefix*`, exact) and the `collection_matches` rule.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::names::NameError;

/// A parsed pattern over collection or topic names.
///
/// `*` matches every name, `<prefix>*` every name that starts with `<prefix>`, anything else
/// only that exact name. A `*` anywhere but at the end is refused by [`CollectionPattern::parse`].
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CollectionPattern {
    /// The text before the trailing `*`, or the whole exact name.
    stem: String,
    /// Whether the pattern ended in `*`.
    is_prefix: bool,
}

impl CollectionPattern {
    /// Parses a pattern. The stem follows the name rule (printable UTF-8 without `/`, at most
    /// 200 bytes) and may be empty only before a `*`.
    pub fn parse(value: impl Into<String>) -> Result<Self, NameError> {
        let value = value.into();
        let err = |rule| NameError { what: "pattern", value: value.clone(), rule };
        let (stem, is_prefix) = match value.strip_suffix('*') {
            Some(stem) => (stem, true),
            None => (value.as_str(), false),
        };
        if stem.contains('*') {
            return Err(err("'*' is only allowed once, at the end (\"*\", \"orders:*\")"));
        }
        if stem.is_empty() && !is_prefix {
            return Err(err("expected a name, a prefix followed by '*', or '*'"));
        }
        if stem.len() > 200 || stem.chars().any(|c| c.is_control() || c == '/') {
            return Err(err("expected printable UTF-8 without '/', at most 200 bytes before '*'"));
        }
        Ok(Self { stem: stem.to_owned(), is_prefix })
    }

    /// The exact name or the prefix, without the `*`.
    pub fn stem(&self) -> &str {
        &self.stem
    }

    /// Whether this pattern matches by prefix (it ended in `*`).
    pub fn is_prefix(&self) -> bool {
        self.is_prefix
    }

    /// Rebuilds a pattern from its stored parts, as the store keeps them.
    pub fn from_parts(stem: String, is_prefix: bool) -> Self {
        Self { stem, is_prefix }
    }

    /// Whether `name` is matched by this pattern.
    pub fn matches(&self, name: &str) -> bool {
        if self.is_prefix { name.starts_with(&self.stem) } else { name == self.stem }
    }
}

/// The `collection_matches` rule of the design: whether `pattern` matches `name`.
pub fn collection_matches(pattern: &CollectionPattern, name: &str) -> bool {
    pattern.matches(name)
}

impl fmt::Display for CollectionPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.stem)?;
        if self.is_prefix {
            f.write_str("*")?;
        }
        Ok(())
    }
}

impl Serialize for CollectionPattern {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for CollectionPattern {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::parse(s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn p(s: &str) -> CollectionPattern {
        CollectionPattern::parse(s).unwrap()
    }

    #[test]
    fn a_star_matches_every_name() {
        assert!(collection_matches(&p("*"), "orders"));
        assert!(collection_matches(&p("*"), "x"));
    }

    #[test]
    fn a_trailing_star_matches_by_prefix() {
        assert!(collection_matches(&p("orders:*"), "orders:eu"));
        assert!(collection_matches(&p("orders:*"), "orders:"));
        assert!(collection_matches(&p("tmp_*"), "tmp_1"));
        assert!(!collection_matches(&p("orders:*"), "orders"));
        assert!(!collection_matches(&p("tmp_*"), "tmp"));
    }

    #[test]
    fn a_pattern_without_star_matches_only_that_name() {
        assert!(collection_matches(&p("orders"), "orders"));
        assert!(!collection_matches(&p("orders"), "orders:eu"));
        assert!(!collection_matches(&p("orders"), "order"));
    }

    #[test]
    fn a_star_anywhere_but_the_end_is_refused_with_a_clear_error() {
        for bad in ["*orders", "ord*ers", "**", "a**", "*a*"] {
            let err = CollectionPattern::parse(bad).unwrap_err();
            assert!(err.to_string().contains("only allowed once, at the end"), "{bad}: {err}");
        }
    }

    #[test]
    fn empty_and_slashed_patterns_are_refused() {
        assert!(CollectionPattern::parse("").is_err());
        assert!(CollectionPattern::parse("a/b*").is_err());
        assert!(CollectionPattern::parse("a\n").is_err());
    }

    #[test]
    fn a_pattern_displays_as_it_was_written() {
        for s in ["*", "orders:*", "orders"] {
            assert_eq!(p(s).to_string(), s);
        }
    }

    proptest! {
        #[test]
        fn star_matches_any_valid_name(name in "[^/*\\p{Cc}]{1,50}") {
            prop_assert!(collection_matches(&p("*"), &name));
        }

        #[test]
        fn prefix_patterns_match_exactly_the_names_with_that_prefix(
            prefix in "[a-z:_]{0,6}",
            name in "[a-z:_]{1,10}",
        ) {
            let pattern = p(&format!("{prefix}*"));
            prop_assert_eq!(collection_matches(&pattern, &name), name.starts_with(&prefix));
        }

        #[test]
        fn exact_patterns_match_only_equal_names(a in "[a-z:]{1,6}", b in "[a-z:]{1,6}") {
            prop_assert_eq!(collection_matches(&p(&a), &b), a == b);
        }

        #[test]
        fn a_star_before_the_end_is_always_refused(
            head in "[a-z]{0,5}", tail in "[a-z]{1,5}", trailing in proptest::bool::ANY
        ) {
            let text = format!("{head}*{tail}{}", if trailing { "*" } else { "" });
            prop_assert!(CollectionPattern::parse(text).is_err());
        }

        #[test]
        fn parsing_any_text_never_panics_and_every_pattern_that_parses_round_trips(
            s in prop_oneof![any::<String>(), "[a-z:*/]{0,8}", "[^/*]{0,205}\\*?"],
        ) {
            if let Ok(pattern) = CollectionPattern::parse(s.clone()) {
                prop_assert_eq!(pattern.to_string(), s);
                let stored = CollectionPattern::from_parts(pattern.stem().to_owned(), pattern.is_prefix());
                prop_assert_eq!(&stored, &pattern);
                let json = serde_json::to_string(&pattern).unwrap();
                prop_assert_eq!(serde_json::from_str::<CollectionPattern>(&json).unwrap(), pattern);
            }
        }

        #[test]
        fn a_pattern_matches_exactly_the_names_its_text_describes(
            text in prop_oneof![any::<String>(), "[ab:]{0,3}\\*?"],
            name in prop_oneof![any::<String>(), "[ab:]{0,4}"],
        ) {
            if let Ok(pattern) = CollectionPattern::parse(text.clone()) {
                let described = match text.strip_suffix('*') {
                    Some(prefix) => name.starts_with(prefix),
                    None => name == text,
                };
                prop_assert_eq!(collection_matches(&pattern, &name), described);
                prop_assert_eq!(pattern.matches(&name), described);
            }
        }

        #[test]
        fn parse_and_display_round_trip(stem in "[^/*\\p{Cc}]{0,20}", star in proptest::bool::ANY) {
            prop_assume!(star || !stem.is_empty());
            let text = format!("{stem}{}", if star { "*" } else { "" });
            prop_assert_eq!(p(&text).to_string(), text);
        }
    }
}
