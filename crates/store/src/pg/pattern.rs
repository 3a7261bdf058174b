//! The `collection_matches` rule of `picloud_core::pattern` in SQL, for the statements that find
//! the triggers an event fires: one predicate, held against the Rust rule by a test.

/// The SQL predicate: whether the pattern stored in the columns `stem` and `is_prefix` matches
/// the name `name` (a column or a parameter), as [`picloud_core::CollectionPattern::matches`]
/// decides: a prefix pattern matches every name that starts with its stem, any other only its
/// stem.
pub(crate) fn pattern_matches(stem: &str, is_prefix: &str, name: &str) -> String {
    format!("CASE WHEN {is_prefix} THEN starts_with({name}, {stem}) ELSE {stem} = {name} END")
}

#[cfg(test)]
mod tests {
    use picloud_core::CollectionPattern;
    use picloud_testkit::TestDatabase;
    use proptest::prelude::*;
    use proptest::strategy::ValueTree as _;
    use proptest::test_runner::TestRunner;

    use super::*;

    /// A name or a stem: short, from a small alphabet (so prefixes and equal names are common),
    /// with the characters that could trip a SQL pattern (`%`, `_`, `\`, quotes) and non-ASCII.
    fn name() -> impl Strategy<Value = String> {
        prop::collection::vec(prop::sample::select(vec!["a", "b", ":", "%", "_", "\\", "'", "é", "日"]), 0..5)
            .prop_map(|parts| parts.concat())
    }

    #[tokio::test]
    async fn the_sql_predicate_matches_exactly_what_the_rust_rule_matches() {
        let db = TestDatabase::create().await.unwrap();
        let pool = sqlx::PgPool::connect(db.url()).await.unwrap();
        let mut runner = TestRunner::deterministic();
        let cases: Vec<(String, bool, String)> = (0..2000)
            .map(|_| {
                let stem = name().new_tree(&mut runner).unwrap().current();
                let is_prefix = stem.is_empty() || any::<bool>().new_tree(&mut runner).unwrap().current();
                let name = prop_oneof![
                    name(),
                    name().prop_map({
                        let stem = stem.clone();
                        move |tail| format!("{stem}{tail}")
                    })
                ]
                .new_tree(&mut runner)
                .unwrap()
                .current();
                (stem, is_prefix, name)
            })
            .collect();
        let (stems, prefixes, names): (Vec<String>, Vec<bool>, Vec<String>) =
            cases.iter().cloned().fold((vec![], vec![], vec![]), |(mut s, mut p, mut n), (a, b, c)| {
                s.push(a);
                p.push(b);
                n.push(c);
                (s, p, n)
            });
        let sql = format!(
            "SELECT {} FROM unnest($1::text[], $2::bool[], $3::text[]) WITH ORDINALITY AS c(stem, is_prefix, name, i)
              ORDER BY i",
            pattern_matches("c.stem", "c.is_prefix", "c.name")
        );
        let matched: Vec<bool> = sqlx::query_scalar(&sql)
            .bind(&stems)
            .bind(&prefixes)
            .bind(&names)
            .fetch_all(&pool)
            .await
            .unwrap();
        for ((stem, is_prefix, name), sql_says) in cases.iter().zip(matched) {
            let rust_says = CollectionPattern::from_parts(stem.clone(), *is_prefix).matches(name);
            assert_eq!(sql_says, rust_says, "pattern {stem:?} (prefix: {is_prefix}) on {name:?}");
        }
    }
}
