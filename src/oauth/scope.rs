//! Scope strings as sets (RFC 6749 §3.3).
//!
//! The RFC says space-delimited, but GitHub, Facebook and Spotify use commas (F7), so parsing
//! takes the provider's separator and *also* splits on whitespace. Results are sorted and
//! deduplicated: scope order carries no meaning, and a canonical form makes "granted subset"
//! comparisons (F8) plain set operations.

use std::collections::BTreeSet;

/// Splits `raw` on `separator` and on whitespace; trims, drops empties, dedups, sorts.
pub fn parse_scopes(raw: &str, separator: &str) -> Vec<String> {
    let pieces: Box<dyn Iterator<Item = &str>> = if separator.is_empty() {
        Box::new(std::iter::once(raw))
    } else {
        Box::new(raw.split(separator))
    };
    pieces
        .flat_map(str::split_whitespace)
        .map(str::to_owned)
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect()
}

/// Joins scopes with `separator` in the given order (the caller decides the order of an
/// authorization URL), skipping blank entries.
pub fn join_scopes(scopes: &[String], separator: &str) -> String {
    scopes
        .iter()
        .map(|scope| scope.trim())
        .filter(|scope| !scope.is_empty())
        .collect::<Vec<_>>()
        .join(separator)
}

/// Every scope in `a` or `b`, sorted and deduplicated.
pub fn union(a: &[String], b: &[String]) -> Vec<String> {
    a.iter()
        .chain(b)
        .cloned()
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect()
}

/// Scopes in `a` that are not in `b` (e.g. requested minus granted), sorted and deduplicated.
pub fn difference(a: &[String], b: &[String]) -> Vec<String> {
    let remove: BTreeSet<&String> = b.iter().collect();
    a.iter()
        .filter(|scope| !remove.contains(scope))
        .cloned()
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn owned(items: &[&str]) -> Vec<String> {
        items.iter().map(|item| (*item).to_owned()).collect()
    }

    fn normalized(items: &[String]) -> Vec<String> {
        items
            .iter()
            .cloned()
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect()
    }

    #[test]
    fn parses_space_and_comma_separated_scopes() {
        assert_eq!(
            parse_scopes("openid  email\tprofile openid", " "),
            owned(&["email", "openid", "profile"])
        );
        assert_eq!(
            parse_scopes("repo,gist, user ,,repo", ","),
            owned(&["gist", "repo", "user"])
        );
        // Leniency: a comma provider that sends spaces still parses.
        assert_eq!(parse_scopes("repo gist", ","), owned(&["gist", "repo"]));
        // With a space separator, commas are part of a scope token (RFC 6749 allows them).
        assert_eq!(parse_scopes("a,b c", " "), owned(&["a,b", "c"]));
        assert_eq!(
            parse_scopes("https://graph.microsoft.com/User.Read offline_access", " "),
            owned(&["https://graph.microsoft.com/User.Read", "offline_access"])
        );
        assert!(parse_scopes("", " ").is_empty());
        assert!(parse_scopes(" , ,", ",").is_empty());
        assert_eq!(parse_scopes("a b", ""), owned(&["a", "b"]));
    }

    #[test]
    fn joins_in_given_order() {
        assert_eq!(
            join_scopes(&owned(&["openid", "email"]), " "),
            "openid email"
        );
        assert_eq!(
            join_scopes(&owned(&["repo", " ", "gist"]), ","),
            "repo,gist"
        );
        assert_eq!(join_scopes(&[], " "), "");
    }

    #[test]
    fn set_operations() {
        let granted = owned(&["openid", "email"]);
        let requested = owned(&["email", "openid", "drive.readonly", "email"]);
        assert_eq!(
            union(&granted, &requested),
            owned(&["drive.readonly", "email", "openid"])
        );
        assert_eq!(difference(&requested, &granted), owned(&["drive.readonly"]));
        assert!(difference(&granted, &requested).is_empty());
    }

    /// RFC 6749 scope-token characters, minus `,` when commas separate.
    fn scope_token(with_comma: bool) -> impl Strategy<Value = String> {
        let pattern = if with_comma {
            "[!#-\\[\\]-~]{1,16}"
        } else {
            "[!#-+\\--\\[\\]-~]{1,16}"
        };
        proptest::string::string_regex(pattern).unwrap()
    }

    proptest! {
        #[test]
        fn parse_inverts_join_space(scopes in proptest::collection::vec(scope_token(true), 0..8)) {
            prop_assert_eq!(parse_scopes(&join_scopes(&scopes, " "), " "), normalized(&scopes));
        }

        #[test]
        fn parse_inverts_join_comma(scopes in proptest::collection::vec(scope_token(false), 0..8)) {
            prop_assert_eq!(parse_scopes(&join_scopes(&scopes, ","), ","), normalized(&scopes));
        }

        #[test]
        fn parse_is_idempotent(raw in ".{0,64}", comma in any::<bool>()) {
            let separator = if comma { "," } else { " " };
            let once = parse_scopes(&raw, separator);
            prop_assert_eq!(parse_scopes(&join_scopes(&once, separator), separator), once.clone());
            let mut sorted = once.clone();
            sorted.sort();
            sorted.dedup();
            prop_assert_eq!(sorted, once);
        }

        #[test]
        fn never_panics(raw in any::<String>(), separator in ".{0,3}") {
            let parsed = parse_scopes(&raw, &separator);
            let _ = join_scopes(&parsed, &separator);
            let _ = union(&parsed, &parsed);
            prop_assert!(difference(&parsed, &parsed).is_empty());
        }

        /// Every parsed scope is a non-empty token with no whitespace and no separator in it,
        /// and every such token of the input is kept.
        #[test]
        fn parsed_scopes_are_clean_tokens(raw in ".{0,80}", separator in prop_oneof![Just(" "), Just(","), Just("+"), Just(""), Just("::")]) {
            let parsed = parse_scopes(&raw, separator);
            for scope in &parsed {
                prop_assert!(!scope.is_empty());
                prop_assert!(!scope.chars().any(char::is_whitespace), "{:?}", scope);
                if !separator.is_empty() {
                    prop_assert!(!scope.contains(separator), "{:?}", scope);
                }
                prop_assert!(raw.contains(scope.as_str()));
            }
        }

        #[test]
        fn union_and_difference_laws(
            a in proptest::collection::vec(scope_token(true), 0..6),
            b in proptest::collection::vec(scope_token(true), 0..6),
        ) {
            let all = union(&a, &b);
            for scope in a.iter().chain(&b) {
                prop_assert!(all.contains(scope));
            }
            let only_a = difference(&a, &b);
            prop_assert!(only_a.iter().all(|scope| a.contains(scope) && !b.contains(scope)));
            prop_assert_eq!(union(&only_a, &b), union(&a, &b));
        }
    }
}
