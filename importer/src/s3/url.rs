//! `s3://bucket/key` addresses, parsed once with errors that say what is wrong.

use std::fmt;
use std::str::FromStr;

use crate::error::{Error, Result};

/// An S3 object: bucket and key.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct S3Url {
    /// The bucket.
    pub bucket: String,
    /// The object key (never empty, no leading `/`).
    pub key: String,
}

const SCHEME: &str = "s3://";

impl S3Url {
    /// Parses `s3://bucket/key`.
    pub fn parse(text: &str) -> Result<Self> {
        let invalid = |why: &str| {
            Error::InvalidInput(format!(
                "{text:?} is not an S3 object URL (s3://bucket/key): {why}"
            ))
        };
        let rest = text
            .strip_prefix(SCHEME)
            .ok_or_else(|| invalid("it does not start with s3://"))?;
        let (bucket, key) = rest
            .split_once('/')
            .ok_or_else(|| invalid("it has no key after the bucket"))?;
        check_bucket(bucket).map_err(|why| invalid(&why))?;
        if key.is_empty() {
            return Err(invalid("the key is empty"));
        }
        if key.len() > MAX_KEY_BYTES {
            return Err(invalid("the key is longer than S3's 1,024 bytes"));
        }
        Ok(Self {
            bucket: bucket.to_owned(),
            key: key.to_owned(),
        })
    }

    /// True if `text` looks like an S3 URL rather than a local path.
    pub fn is_s3(text: &str) -> bool {
        text.starts_with(SCHEME)
    }

    /// The key's folder, with its trailing `/` (empty at the bucket's root).
    pub fn prefix(&self) -> &str {
        self.key.rfind('/').map_or("", |at| &self.key[..=at])
    }
}

impl FromStr for S3Url {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Self::parse(s)
    }
}

impl fmt::Display for S3Url {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{SCHEME}{}/{}", self.bucket, self.key)
    }
}

/// S3's limit on a key's length in UTF-8 bytes.
const MAX_KEY_BYTES: usize = 1024;

/// The rules S3 applies to bucket names today (3–63 characters of lowercase letters,
/// digits, dots and hyphens, starting and ending with a letter or digit). Checked here so a
/// typo fails before any request, with a reason, instead of as a signature or DNS error.
fn check_bucket(bucket: &str) -> std::result::Result<(), String> {
    if bucket.is_empty() {
        return Err("the bucket is empty".into());
    }
    if !(3..=63).contains(&bucket.len()) {
        return Err(format!("bucket {bucket:?} must be 3 to 63 characters long"));
    }
    if let Some(c) = bucket
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '.' || *c == '-'))
    {
        return Err(format!(
            "bucket {bucket:?} contains {c:?} (only a-z, 0-9, '.' and '-')"
        ));
    }
    let edge_ok = |c: Option<char>| c.is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    if !edge_ok(bucket.chars().next()) || !edge_ok(bucket.chars().last()) {
        return Err(format!(
            "bucket {bucket:?} must start and end with a letter or digit"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_bucket_and_key() {
        let url = S3Url::parse("s3://my-bucket/images/vm1/disk.vmdk").unwrap();
        assert_eq!(url.bucket, "my-bucket");
        assert_eq!(url.key, "images/vm1/disk.vmdk");
        assert_eq!(url.prefix(), "images/vm1/");
        assert_eq!(url.to_string(), "s3://my-bucket/images/vm1/disk.vmdk");
        assert_eq!(S3Url::parse("s3://b12/k").unwrap().prefix(), "");
    }

    #[test]
    fn errors_say_what_is_wrong() {
        for (text, why) in [
            ("/local/disk.vmdk", "does not start with s3://"),
            ("s3://bucket", "no key"),
            ("s3://bucket/", "key is empty"),
            ("s3:///key", "bucket is empty"),
            ("s3://My_Bucket/k", "contains 'M'"),
            ("s3://ab/k", "3 to 63"),
            ("s3://-abc/k", "start and end"),
        ] {
            let err = S3Url::parse(text).unwrap_err().to_string();
            assert!(err.contains(why), "{text}: {err}");
            assert!(err.contains(text), "{text}: {err}");
        }
    }
}
