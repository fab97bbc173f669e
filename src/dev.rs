//! `oauth-manager dev`: a one-command local setup. Generates and keeps a development encryption
//! key and JWT secret (mode 0600) under a local folder, and mints bearer tokens to call the API.
//! NOT for production: the secrets sit in plain files next to the database.

use std::io;
use std::path::{Path, PathBuf};

use chrono::{DateTime, Duration, Utc};
use jsonwebtoken::{encode, EncodingKey, Header};
use rand::RngCore;
use secrecy::{ExposeSecret, SecretString};
use serde::Serialize;

use crate::crypto::KeyMaterial;

pub const DEFAULT_DIR: &str = ".oauth-manager-dev";
pub const DEV_LISTEN_ADDR: &str = "127.0.0.1:8000";
const TOKEN_LIFETIME: Duration = Duration::hours(12);

/// The secrets of a development setup, created on first use and reused afterwards.
pub struct DevSecrets {
    pub dir: PathBuf,
    pub encryption_key: SecretString,
    pub jwt_secret: SecretString,
}

impl DevSecrets {
    pub fn load_or_create(dir: &Path) -> io::Result<Self> {
        create_private_dir(dir)?;
        let encryption_key = read_or_create(&dir.join("encryption.key"), || {
            KeyMaterial::generate().to_base64().to_string()
        })?;
        let jwt_secret = read_or_create(&dir.join("jwt.secret"), || {
            let mut bytes = [0u8; 48];
            rand::rngs::OsRng.fill_bytes(&mut bytes);
            bytes.iter().map(|byte| format!("{byte:02x}")).collect()
        })?;
        Ok(Self {
            dir: dir.to_path_buf(),
            encryption_key,
            jwt_secret,
        })
    }

    /// An HS256 token for `user` with `roles`, valid for 12 hours from `now`.
    pub fn mint_token(
        &self,
        user: &str,
        roles: &[&str],
        now: DateTime<Utc>,
    ) -> Result<String, jsonwebtoken::errors::Error> {
        #[derive(Serialize)]
        struct Claims<'a> {
            sub: &'a str,
            roles: &'a [&'a str],
            iat: i64,
            exp: i64,
        }
        let claims = Claims {
            sub: user,
            roles,
            iat: now.timestamp(),
            exp: (now + TOKEN_LIFETIME).timestamp(),
        };
        let key = EncodingKey::from_secret(self.jwt_secret.expose_secret().as_bytes());
        encode(&Header::default(), &claims, &key)
    }
}

fn create_private_dir(dir: &Path) -> io::Result<()> {
    std::fs::create_dir_all(dir)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    }
    Ok(())
}

fn read_or_create(path: &Path, generate: impl FnOnce() -> String) -> io::Result<SecretString> {
    match std::fs::read_to_string(path) {
        Ok(existing) => return Ok(SecretString::from(existing.trim().to_owned())),
        Err(err) if err.kind() != io::ErrorKind::NotFound => return Err(err),
        Err(_) => {}
    }
    let value = generate();
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    io::Write::write_all(&mut options.open(path)?, value.as_bytes())?;
    Ok(SecretString::from(value))
}

pub const BANNER: &str = "\
################################################################################
#  oauth-manager DEV MODE -- NOT FOR PRODUCTION                                #
#  Keys and the JWT secret are plain files in the folder below; tokens printed #
#  here grant access to everything this instance stores.                       #
################################################################################";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_created_private_and_reused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let first = DevSecrets::load_or_create(&dir.path().join("dev")).expect("created");
        let second = DevSecrets::load_or_create(&dir.path().join("dev")).expect("reused");
        assert_eq!(
            first.encryption_key.expose_secret(),
            second.encryption_key.expose_secret()
        );
        assert_eq!(
            first.jwt_secret.expose_secret(),
            second.jwt_secret.expose_secret()
        );
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            for file in ["encryption.key", "jwt.secret"] {
                let mode = std::fs::metadata(dir.path().join("dev").join(file))
                    .expect("file")
                    .permissions()
                    .mode();
                assert_eq!(mode & 0o777, 0o600, "{file}");
            }
        }
        assert!(crate::config::decode_key("k", first.encryption_key.expose_secret()).is_ok());
    }
}
