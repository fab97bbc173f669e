//! PKCE (RFC 7636), S256 only, plus the random values for `state` and `nonce`.
//!
//! `plain` is deliberately not representable: it offers no protection when the authorization
//! request leaks, and RFC 9700 §2.1.1 forbids falling back to it (R2).

use std::fmt;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use rand::RngCore;
use secrecy::{ExposeSecret, SecretString};
use sha2::{Digest, Sha256};

/// The only `code_challenge_method` this client ever sends.
pub const METHOD: &str = "S256";

/// Entropy of a verifier: 32 bytes → 43 base64url characters (RFC 7636 §4.1 minimum length).
const VERIFIER_BYTES: usize = 32;

/// A fresh verifier (kept secret until the token request) and its public challenge.
#[derive(Clone)]
pub struct Pkce {
    pub verifier: SecretString,
    pub challenge: String,
}

impl Pkce {
    /// A new pair from the OS CSPRNG; use one per authorization request, never reuse.
    pub fn generate() -> Self {
        let verifier = random_urlsafe(VERIFIER_BYTES);
        let challenge = s256_challenge(&verifier);
        Self {
            verifier: SecretString::from(verifier),
            challenge,
        }
    }

    /// Recomputes the challenge from the verifier, e.g. to check a stored pair (in constant
    /// time: the verifier is a secret).
    pub fn matches(&self) -> bool {
        crate::crypto::secrets_equal(
            s256_challenge(self.verifier.expose_secret()).as_bytes(),
            self.challenge.as_bytes(),
        )
    }
}

impl fmt::Debug for Pkce {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pkce")
            .field("verifier", &"[REDACTED]")
            .field("challenge", &self.challenge)
            .finish()
    }
}

/// `BASE64URL(SHA256(ASCII(code_verifier)))`, RFC 7636 §4.2.
pub fn s256_challenge(verifier: &str) -> String {
    URL_SAFE_NO_PAD.encode(Sha256::digest(verifier.as_bytes()))
}

/// `bytes` random bytes from the OS CSPRNG, base64url without padding. 32 bytes (256 bits) is
/// what `state` and `nonce` use: far beyond the 128 bits RFC 6749 §10.10 asks for.
pub fn random_urlsafe(bytes: usize) -> String {
    let mut buffer = vec![0u8; bytes];
    rand::rngs::OsRng.fill_bytes(&mut buffer);
    URL_SAFE_NO_PAD.encode(buffer)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashSet;

    fn is_unreserved(text: &str) -> bool {
        text.bytes()
            .all(|byte| byte.is_ascii_alphanumeric() || byte == b'-' || byte == b'_')
    }

    #[test]
    fn rfc7636_appendix_b_vector() {
        assert_eq!(
            s256_challenge("dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk"),
            "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"
        );
    }

    #[test]
    fn generated_pairs_are_well_formed_and_unique() {
        let mut verifiers = HashSet::new();
        let mut challenges = HashSet::new();
        for _ in 0..200 {
            let pkce = Pkce::generate();
            let verifier = pkce.verifier.expose_secret();
            assert_eq!(verifier.len(), 43);
            assert!(is_unreserved(verifier), "{verifier}");
            assert_eq!(pkce.challenge.len(), 43);
            assert!(is_unreserved(&pkce.challenge));
            assert!(pkce.matches());
            assert!(verifiers.insert(verifier.to_owned()));
            assert!(challenges.insert(pkce.challenge.clone()));
        }
    }

    #[test]
    fn matches_refuses_a_pair_that_does_not_belong_together() {
        let pkce = Pkce::generate();
        assert!(pkce.matches());
        let other = Pkce::generate();
        let mixed = Pkce {
            verifier: pkce.verifier.clone(),
            challenge: other.challenge,
        };
        assert!(!mixed.matches());
        let truncated = Pkce {
            verifier: pkce.verifier.clone(),
            challenge: pkce.challenge[..42].to_owned(),
        };
        assert!(!truncated.matches());
    }

    #[test]
    fn debug_redacts_the_verifier() {
        let pkce = Pkce::generate();
        let debug = format!("{pkce:?}");
        assert!(!debug.contains(pkce.verifier.expose_secret()));
        assert!(debug.contains(&pkce.challenge));
    }

    #[test]
    fn state_and_nonce_values() {
        let state = random_urlsafe(32);
        assert_eq!(state.len(), 43);
        assert!(is_unreserved(&state));
        assert_ne!(state, random_urlsafe(32));
        assert_eq!(random_urlsafe(0), "");
        assert_eq!(METHOD, "S256");
    }

    proptest! {
        #[test]
        fn challenge_is_always_43_urlsafe_chars(verifier in "[A-Za-z0-9._~-]{43,128}") {
            let challenge = s256_challenge(&verifier);
            prop_assert_eq!(challenge.len(), 43);
            prop_assert!(is_unreserved(&challenge));
        }

        #[test]
        fn random_length_matches_base64url(bytes in 0usize..200) {
            let value = random_urlsafe(bytes);
            prop_assert_eq!(value.len(), (bytes * 4).div_ceil(3));
            prop_assert!(is_unreserved(&value));
        }
    }
}
