//! Encryption of token material at rest.
//!
//! XChaCha20-Poly1305 (RustCrypto): a random 192-bit nonce per value is safe without a counter,
//! and the tag authenticates both the ciphertext and the *associated data*, which names the
//! table, column, row and owner the value belongs to. A ciphertext copied into another row or
//! column therefore fails to decrypt instead of handing one user's token to another.
//!
//! Each stored row records the id of the key its values were sealed with. Key ids are derived
//! from the key material, so operators never have to name keys, and a keyring holds the active
//! key plus older keys that stay readable until `oauth-manager keys rotate` has re-sealed
//! everything under the active one.

use std::collections::HashMap;
use std::fmt;

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use rand::RngCore;
use secrecy::{ExposeSecret, SecretString};
use sha2::{Digest, Sha256};
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

const NONCE_LEN: usize = 24;
const KEY_LEN: usize = 32;
/// Domain separation: a different format version never verifies against this one.
const AAD_VERSION: &str = "oauth-manager/v1";

/// Whether two secrets are equal, in time that depends on their lengths only, never on where
/// they first differ (`subtle`): for every comparison of a secret held in memory (the ID
/// token's `nonce`, a caller-reported access token, a PKCE pair), so response timing cannot
/// reveal how much of a guess was right. Secret lengths are not secret here (they are fixed
/// by the formats).
pub fn secrets_equal(a: &[u8], b: &[u8]) -> bool {
    bool::from(subtle::ConstantTimeEq::ct_eq(a, b))
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CryptoError {
    #[error("value was sealed with key {0}, which is not in the keyring (set OAUTH_ENCRYPTION_OLD_KEYS)")]
    UnknownKey(String),
    #[error("ciphertext failed authentication (tampered, truncated, or moved from another row)")]
    Authentication,
    #[error("decrypted value is not UTF-8")]
    NotUtf8,
    #[error("two configured keys are identical")]
    DuplicateKey,
}

/// 32 bytes of key material; never printed, wiped on drop.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct KeyMaterial([u8; KEY_LEN]);

impl KeyMaterial {
    pub fn from_slice(bytes: &[u8]) -> Option<Self> {
        let array: [u8; KEY_LEN] = bytes.try_into().ok()?;
        Some(Self(array))
    }

    /// A fresh key from the operating system's CSPRNG.
    pub fn generate() -> Self {
        let mut bytes = [0u8; KEY_LEN];
        rand::rngs::OsRng.fill_bytes(&mut bytes);
        Self(bytes)
    }

    pub fn to_base64(&self) -> Zeroizing<String> {
        use base64::Engine;
        Zeroizing::new(base64::engine::general_purpose::STANDARD.encode(self.0))
    }

    /// Stable, non-secret identifier: a truncated hash of the key, never the key itself.
    pub fn key_id(&self) -> String {
        let digest = Sha256::new()
            .chain_update(b"oauth-manager key id\0")
            .chain_update(self.0)
            .finalize();
        let hex: String = digest[..6]
            .iter()
            .map(|byte| format!("{byte:02x}"))
            .collect();
        format!("k1-{hex}")
    }
}

impl fmt::Debug for KeyMaterial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyMaterial({})", self.key_id())
    }
}

/// Where a value lives. Sealing and opening must name the same place.
#[derive(Debug, Clone, Copy)]
pub struct Aad<'a> {
    pub table: &'static str,
    pub column: &'static str,
    pub row_id: &'a str,
    pub owner: &'a str,
}

impl Aad<'_> {
    fn to_bytes(self) -> Vec<u8> {
        // Length-prefixed fields, so no two different places serialise alike.
        let mut out = Vec::with_capacity(64);
        for field in [
            AAD_VERSION,
            self.table,
            self.column,
            self.row_id,
            self.owner,
        ] {
            out.extend_from_slice(&(field.len() as u32).to_be_bytes());
            out.extend_from_slice(field.as_bytes());
        }
        out
    }
}

pub struct Keyring {
    active_id: String,
    ciphers: HashMap<String, XChaCha20Poly1305>,
}

impl fmt::Debug for Keyring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut ids: Vec<&String> = self.ciphers.keys().collect();
        ids.sort();
        f.debug_struct("Keyring")
            .field("active", &self.active_id)
            .field("keys", &ids)
            .finish()
    }
}

impl Keyring {
    pub fn new(active: &KeyMaterial, old: &[KeyMaterial]) -> Result<Self, CryptoError> {
        let mut ciphers = HashMap::new();
        for key in std::iter::once(active).chain(old) {
            let cipher = XChaCha20Poly1305::new((&key.0).into());
            if ciphers.insert(key.key_id(), cipher).is_some() {
                return Err(CryptoError::DuplicateKey);
            }
        }
        Ok(Self {
            active_id: active.key_id(),
            ciphers,
        })
    }

    pub fn active_key_id(&self) -> &str {
        &self.active_id
    }

    pub fn has_key(&self, key_id: &str) -> bool {
        self.ciphers.contains_key(key_id)
    }

    /// Seals `plaintext` under the active key: `nonce || ciphertext || tag`.
    pub fn seal(&self, plaintext: &SecretString, aad: Aad<'_>) -> Result<Vec<u8>, CryptoError> {
        let cipher = self
            .ciphers
            .get(&self.active_id)
            .ok_or_else(|| CryptoError::UnknownKey(self.active_id.clone()))?;
        let mut nonce = [0u8; NONCE_LEN];
        rand::rngs::OsRng.fill_bytes(&mut nonce);
        let aad_bytes = aad.to_bytes();
        let payload = Payload {
            msg: plaintext.expose_secret().as_bytes(),
            aad: &aad_bytes,
        };
        let sealed = cipher
            .encrypt(XNonce::from_slice(&nonce), payload)
            .map_err(|_| CryptoError::Authentication)?;
        let mut out = Vec::with_capacity(NONCE_LEN + sealed.len());
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&sealed);
        Ok(out)
    }

    /// Opens a value sealed with `key_id` at the place `aad` names.
    pub fn open(
        &self,
        key_id: &str,
        blob: &[u8],
        aad: Aad<'_>,
    ) -> Result<SecretString, CryptoError> {
        let cipher = self
            .ciphers
            .get(key_id)
            .ok_or_else(|| CryptoError::UnknownKey(key_id.to_owned()))?;
        if blob.len() < NONCE_LEN {
            return Err(CryptoError::Authentication);
        }
        let (nonce, sealed) = blob.split_at(NONCE_LEN);
        let aad_bytes = aad.to_bytes();
        let plain = Zeroizing::new(
            cipher
                .decrypt(
                    XNonce::from_slice(nonce),
                    Payload {
                        msg: sealed,
                        aad: &aad_bytes,
                    },
                )
                .map_err(|_| CryptoError::Authentication)?,
        );
        let text = std::str::from_utf8(&plain).map_err(|_| CryptoError::NotUtf8)?;
        Ok(SecretString::from(text.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn secrets_equal_compares_whole_values() {
        assert!(secrets_equal(b"n-0S6_WzA2Mj", b"n-0S6_WzA2Mj"));
        assert!(secrets_equal(b"", b""));
        assert!(
            !secrets_equal(b"n-0S6_WzA2Mj", b"x-0S6_WzA2Mj"),
            "first byte"
        );
        assert!(
            !secrets_equal(b"n-0S6_WzA2Mj", b"n-0S6_WzA2Mx"),
            "last byte"
        );
        assert!(!secrets_equal(b"n-0S6_WzA2Mj", b"n-0S6_WzA2M"), "a prefix");
        assert!(
            !secrets_equal(b"n-0S6_WzA2M", b"n-0S6_WzA2Mj"),
            "a longer value"
        );
        assert!(!secrets_equal(b"", b"x"));
    }

    proptest! {
        #[test]
        fn secrets_equal_agrees_with_plain_equality(
            a in proptest::collection::vec(any::<u8>(), 0..48),
            b in proptest::collection::vec(any::<u8>(), 0..48),
        ) {
            prop_assert_eq!(secrets_equal(&a, &b), a == b);
            prop_assert!(secrets_equal(&a, &a.clone()));
        }
    }

    fn aad<'a>(row: &'a str, owner: &'a str) -> Aad<'a> {
        Aad {
            table: "oauth_tokens",
            column: "access_token",
            row_id: row,
            owner,
        }
    }

    fn secret(value: &str) -> SecretString {
        SecretString::from(value.to_owned())
    }

    #[test]
    fn round_trip_and_fresh_nonce_per_value() {
        let ring = Keyring::new(&KeyMaterial::generate(), &[]).expect("ring");
        let a = ring
            .seal(&secret("ya29.token"), aad("row-1", "alice"))
            .expect("seal");
        let b = ring
            .seal(&secret("ya29.token"), aad("row-1", "alice"))
            .expect("seal");
        assert_ne!(a, b, "same plaintext must not give the same ciphertext");
        let opened = ring
            .open(ring.active_key_id(), &a, aad("row-1", "alice"))
            .expect("open");
        assert_eq!(opened.expose_secret(), "ya29.token");
        assert!(!a.windows(10).any(|w| w == b"ya29.token"));
    }

    #[test]
    fn tampering_is_detected_byte_by_byte() {
        let ring = Keyring::new(&KeyMaterial::generate(), &[]).expect("ring");
        let sealed = ring.seal(&secret("refresh"), aad("r", "u")).expect("seal");
        for index in 0..sealed.len() {
            let mut bad = sealed.clone();
            bad[index] ^= 0x01;
            assert_eq!(
                ring.open(ring.active_key_id(), &bad, aad("r", "u"))
                    .map(|_| ()),
                Err(CryptoError::Authentication),
                "flipped byte {index} was not detected"
            );
        }
        assert!(ring
            .open(ring.active_key_id(), &sealed[..10], aad("r", "u"))
            .is_err());
    }

    #[test]
    fn a_value_moved_to_another_place_does_not_open() {
        let ring = Keyring::new(&KeyMaterial::generate(), &[]).expect("ring");
        let sealed = ring
            .seal(&secret("t"), aad("row-1", "alice"))
            .expect("seal");
        let id = ring.active_key_id().to_owned();
        assert!(
            ring.open(&id, &sealed, aad("row-2", "alice")).is_err(),
            "other row"
        );
        assert!(
            ring.open(&id, &sealed, aad("row-1", "bob")).is_err(),
            "other owner"
        );
        let other_column = Aad {
            column: "refresh_token",
            ..aad("row-1", "alice")
        };
        assert!(
            ring.open(&id, &sealed, other_column).is_err(),
            "other column"
        );
    }

    #[test]
    fn old_keys_stay_readable_and_unknown_keys_are_named() {
        let old = KeyMaterial::generate();
        let new = KeyMaterial::generate();
        let before = Keyring::new(&old, &[]).expect("ring");
        let sealed = before.seal(&secret("t"), aad("r", "u")).expect("seal");
        let after = Keyring::new(&new, std::slice::from_ref(&old)).expect("ring");
        assert_eq!(
            after
                .open(&old.key_id(), &sealed, aad("r", "u"))
                .expect("old key")
                .expose_secret(),
            "t"
        );
        let without_old = Keyring::new(&new, &[]).expect("ring");
        assert_eq!(
            without_old
                .open(&old.key_id(), &sealed, aad("r", "u"))
                .map(|_| ()),
            Err(CryptoError::UnknownKey(old.key_id()))
        );
    }

    #[test]
    fn duplicate_keys_are_rejected_and_debug_hides_material() {
        let key = KeyMaterial::generate();
        assert_eq!(
            Keyring::new(&key, std::slice::from_ref(&key)).map(|_| ()),
            Err(CryptoError::DuplicateKey)
        );
        let printed = format!("{key:?}");
        assert!(!printed.contains(key.to_base64().as_str()));
        assert!(printed.contains(&key.key_id()));
    }

    proptest! {
        #[test]
        fn any_value_round_trips(value in ".{0,300}", row in "[a-z0-9-]{1,40}", owner in ".{0,40}") {
            let ring = Keyring::new(&KeyMaterial::generate(), &[]).expect("ring");
            let sealed = ring.seal(&secret(&value), aad(&row, &owner)).expect("seal");
            let opened = ring.open(ring.active_key_id(), &sealed, aad(&row, &owner)).expect("open");
            prop_assert_eq!(opened.expose_secret(), value.as_str());
        }
    }
}
