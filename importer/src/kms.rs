//! `--kms-key-id`: the KMS key a first-of-chain snapshot is encrypted with, as users name it
//! (key id, `alias/name`, alias ARN or key ARN), resolved to the key ARN with DescribeKey.
//!
//! StartSnapshot takes only a key ARN (`KmsKeyArn`), and a key that is disabled, pending
//! deletion or asymmetric makes EBS fail the snapshot late, after blocks were sent. Resolving
//! first turns an alias into the ARN EBS needs and refuses an unusable key before anything is
//! uploaded, with an error that names the key and the region it was looked up in (a key in
//! another region is the usual cause of "does not exist").

use aws_sdk_kms::types::{KeySpec, KeyState, KeyUsageType};
use aws_smithy_types::retry::RetryConfig;
use aws_smithy_types::timeout::TimeoutConfig;
use rehost_core::ErrorKind;

use crate::aws::AwsOptions;
use crate::retry::{ATTEMPT_TIMEOUT, NotFound, RetryPolicy, classify, with_retry};

/// A KMS key as the user named it, told apart by its shape (KMS accepts all four in
/// DescribeKey; only the key ARN is what EBS takes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyRef {
    /// `1234abcd-12ab-34cd-56ef-1234567890ab` or a multi-Region `mrk-…` id.
    KeyId(String),
    /// `alias/name`.
    Alias(String),
    /// `arn:aws:kms:region:account:alias/name`.
    AliasArn(String),
    /// `arn:aws:kms:region:account:key/id`: already what EBS takes.
    KeyArn(String),
}

impl KeyRef {
    /// Classifies `key`, refusing what no KMS key can be named by (before any call, so a
    /// typo is reported as such rather than as a missing key).
    pub fn parse(key: &str) -> Result<Self, KmsError> {
        let invalid = |why: &str| KmsError::Invalid {
            key: key.to_owned(),
            why: why.to_owned(),
        };
        if key.is_empty() {
            return Err(invalid("empty"));
        }
        if key.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(invalid("contains whitespace"));
        }
        if let Some(rest) = key.strip_prefix("arn:") {
            // arn:PARTITION:kms:REGION:ACCOUNT:RESOURCE; the resource holds no ':'.
            let parts: Vec<&str> = rest.splitn(5, ':').collect();
            let [partition, service, region, account, resource] = parts[..] else {
                return Err(invalid(
                    "an ARN has the form arn:aws:kms:REGION:ACCOUNT:key/ID",
                ));
            };
            if partition.is_empty() || service != "kms" || region.is_empty() || account.is_empty() {
                return Err(invalid("not a KMS ARN (arn:aws:kms:REGION:ACCOUNT:key/ID)"));
            }
            return match resource.split_once('/') {
                Some(("key", id)) if !id.is_empty() && !id.contains('/') => {
                    Ok(KeyRef::KeyArn(key.to_owned()))
                }
                Some(("alias", name)) if !name.is_empty() => Ok(KeyRef::AliasArn(key.to_owned())),
                _ => Err(invalid("a KMS ARN names key/ID or alias/NAME")),
            };
        }
        if let Some(name) = key.strip_prefix("alias/") {
            return if name.is_empty() {
                Err(invalid("alias/ needs a name"))
            } else {
                Ok(KeyRef::Alias(key.to_owned()))
            };
        }
        if key.contains('/') || key.contains(':') {
            return Err(invalid(
                "expected a key id, alias/NAME, an alias ARN or a key ARN",
            ));
        }
        Ok(KeyRef::KeyId(key.to_owned()))
    }

    /// The text as given.
    pub fn as_str(&self) -> &str {
        match self {
            KeyRef::KeyId(s) | KeyRef::Alias(s) | KeyRef::AliasArn(s) | KeyRef::KeyArn(s) => s,
        }
    }
}

/// Whether `s` is a KMS key ARN (what StartSnapshot's `KmsKeyArn` takes).
pub fn is_key_arn(s: &str) -> bool {
    matches!(KeyRef::parse(s), Ok(KeyRef::KeyArn(_)))
}

/// A key found usable for EBS encryption.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedKey {
    /// As the user named it.
    pub given: String,
    /// The key's ARN (StartSnapshot's `KmsKeyArn`).
    pub arn: String,
    /// The key's id.
    pub key_id: String,
}

/// Why a key cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum KmsError {
    /// Not a shape any KMS key is named by.
    #[error("KMS key {key:?} is not a valid key name: {why}")]
    Invalid { key: String, why: String },
    /// DescribeKey found no such key (or alias) in the region.
    #[error(
        "KMS key {key:?} does not exist in region {region} (or is not visible to these credentials)"
    )]
    NotFound { key: String, region: String },
    /// The key exists but cannot encrypt now (disabled, pending deletion or import, …).
    #[error("KMS key {key:?} ({arn}) is {state}: EBS can only encrypt with an enabled key")]
    NotEnabled {
        key: String,
        arn: String,
        state: String,
    },
    /// The key exists but is not a symmetric encryption key, the only kind EBS uses.
    #[error(
        "KMS key {key:?} ({arn}) is a {spec} key for {usage}: EBS needs a symmetric encryption key (SYMMETRIC_DEFAULT, ENCRYPT_DECRYPT)"
    )]
    NotSymmetric {
        key: String,
        arn: String,
        spec: String,
        usage: String,
    },
    /// DescribeKey failed otherwise (access, network, throttling past the retries).
    #[error("looking up KMS key {key:?}")]
    Describe {
        key: String,
        #[source]
        source: crate::Error,
    },
    /// DescribeKey answered without key metadata or ARN.
    #[error("KMS key {key:?}: DescribeKey answered without the key's ARN")]
    NoArn { key: String },
}

impl KmsError {
    /// How a caller should treat this error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            KmsError::Invalid { .. }
            | KmsError::NotEnabled { .. }
            | KmsError::NotSymmetric { .. } => ErrorKind::InvalidInput,
            KmsError::NotFound { .. } => ErrorKind::NotFound,
            KmsError::Describe { source, .. } => source.kind(),
            KmsError::NoArn { .. } => ErrorKind::Transient,
        }
    }
}

impl From<KmsError> for crate::Error {
    fn from(e: KmsError) -> Self {
        let kind = e.kind();
        match e {
            // The SDK error already names the operation; add the key it was about.
            KmsError::Describe {
                key,
                source:
                    crate::Error::Aws {
                        operation,
                        code,
                        message,
                        kind,
                    },
            } => crate::Error::Aws {
                operation,
                code,
                message: format!("KMS key {key:?}: {message}"),
                kind,
            },
            KmsError::Describe { source, .. } => source,
            other => match kind {
                ErrorKind::InvalidInput => crate::Error::InvalidInput(other.to_string()),
                _ => crate::Error::Aws {
                    operation: "DescribeKey",
                    code: None,
                    message: other.to_string(),
                    kind,
                },
            },
        }
    }
}

/// Resolves KMS key names to key ARNs.
#[derive(Debug, Clone)]
pub struct KeyResolver {
    kms: aws_sdk_kms::Client,
    retry: RetryPolicy,
}

impl KeyResolver {
    /// A resolver on `kms`; the SDK's retries are switched off (ours log and classify, see
    /// [`crate::retry`]) and each attempt is bounded.
    pub fn new(kms: &aws_sdk_kms::Client, retry: RetryPolicy) -> Self {
        let conf = kms.config();
        let mut timeouts = conf
            .timeout_config()
            .cloned()
            .unwrap_or_else(TimeoutConfig::disabled)
            .to_builder();
        timeouts.set_operation_attempt_timeout(Some(ATTEMPT_TIMEOUT));
        let kms = aws_sdk_kms::Client::from_conf(
            conf.to_builder()
                .retry_config(RetryConfig::disabled())
                .timeout_config(timeouts.build())
                .build(),
        );
        Self { kms, retry }
    }

    /// A resolver with its own KMS client, configured like [`crate::aws::Clients::load`]
    /// (same region, profile, endpoint and credentials).
    pub async fn load(options: &AwsOptions) -> Self {
        let config = crate::aws::sdk_config(options).await;
        Self::new(&aws_sdk_kms::Client::new(&config), RetryPolicy::default())
    }

    fn region(&self) -> String {
        self.kms
            .config()
            .region()
            .map_or_else(|| "(no region set)".to_owned(), |r| r.to_string())
    }

    /// The ARN of the key `key` names, checked to be enabled and symmetric.
    pub async fn resolve(&self, key: &str) -> Result<ResolvedKey, KmsError> {
        let key_ref = KeyRef::parse(key)?;
        let given = key_ref.as_str().to_owned();
        let answer = with_retry(&self.retry, NotFound::Fail, || {
            let request = self.kms.describe_key().key_id(&given);
            async move {
                request
                    .send()
                    .await
                    .map_err(|e| classify("DescribeKey", "", &e))
            }
        })
        .await;
        let output = match answer {
            Ok(output) => output,
            // KMS answers a missing key or alias with NotFoundException (HTTP 400).
            Err(crate::Error::Aws { code: Some(c), .. }) if c == "NotFoundException" => {
                return Err(KmsError::NotFound {
                    key: given,
                    region: self.region(),
                });
            }
            Err(source) => return Err(KmsError::Describe { key: given, source }),
        };
        let Some(meta) = output.key_metadata() else {
            return Err(KmsError::NoArn { key: given });
        };
        let Some(arn) = meta.arn().filter(|a| is_key_arn(a)).map(str::to_owned) else {
            return Err(KmsError::NoArn { key: given });
        };
        check_usable(
            &given,
            &arn,
            meta.key_state(),
            meta.key_spec(),
            meta.key_usage(),
        )?;
        tracing::info!(key = given, arn, "KMS key resolved");
        Ok(ResolvedKey {
            given,
            arn,
            key_id: meta.key_id().to_owned(),
        })
    }
}

/// Refuses a key EBS cannot encrypt with. A missing spec or usage (older keys, emulators)
/// is taken as the default, symmetric encryption, which is what KMS creates by default.
fn check_usable(
    key: &str,
    arn: &str,
    state: Option<&KeyState>,
    spec: Option<&KeySpec>,
    usage: Option<&KeyUsageType>,
) -> Result<(), KmsError> {
    match state {
        Some(KeyState::Enabled) => {}
        other => {
            return Err(KmsError::NotEnabled {
                key: key.to_owned(),
                arn: arn.to_owned(),
                state: other.map_or_else(|| "in no reported state".to_owned(), |s| s.to_string()),
            });
        }
    }
    let symmetric = spec.is_none_or(|s| *s == KeySpec::SymmetricDefault);
    let encrypts = usage.is_none_or(|u| *u == KeyUsageType::EncryptDecrypt);
    if !(symmetric && encrypts) {
        return Err(KmsError::NotSymmetric {
            key: key.to_owned(),
            arn: arn.to_owned(),
            spec: spec.map_or_else(|| "SYMMETRIC_DEFAULT".to_owned(), |s| s.to_string()),
            usage: usage.map_or_else(|| "ENCRYPT_DECRYPT".to_owned(), |u| u.to_string()),
        });
    }
    Ok(())
}

/// The encryption a first snapshot asks for: none unless `encrypted` or a key is named;
/// a named key (id, alias or ARN) resolved to its ARN and checked usable first, since
/// StartSnapshot takes only an ARN and a wrong key must stop an import before it starts.
pub async fn encryption(
    options: &AwsOptions,
    encrypted: bool,
    kms_key_id: Option<&str>,
) -> Result<crate::ebs::uploader::Encryption, KmsError> {
    use crate::ebs::uploader::Encryption;
    let Some(key) = kms_key_id else {
        return Ok(if encrypted {
            Encryption::Encrypted { kms_key_arn: None }
        } else {
            Encryption::Default
        });
    };
    let resolved = KeyResolver::load(options).await.resolve(key).await?;
    Ok(Encryption::Encrypted {
        kms_key_arn: Some(resolved.arn),
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const ARN: &str = "arn:aws:kms:us-east-1:123456789012:key/1234abcd-12ab-34cd-56ef-1234567890ab";

    #[test]
    fn every_way_of_naming_a_key_is_told_apart() {
        assert_eq!(
            KeyRef::parse("1234abcd-12ab-34cd-56ef-1234567890ab").unwrap(),
            KeyRef::KeyId("1234abcd-12ab-34cd-56ef-1234567890ab".into())
        );
        assert_eq!(
            KeyRef::parse("mrk-1234abcd12ab34cd56ef1234567890ab").unwrap(),
            KeyRef::KeyId("mrk-1234abcd12ab34cd56ef1234567890ab".into())
        );
        assert_eq!(
            KeyRef::parse("alias/ebs/backups").unwrap(),
            KeyRef::Alias("alias/ebs/backups".into())
        );
        assert_eq!(
            KeyRef::parse("arn:aws:kms:eu-west-1:123456789012:alias/backups").unwrap(),
            KeyRef::AliasArn("arn:aws:kms:eu-west-1:123456789012:alias/backups".into())
        );
        assert_eq!(KeyRef::parse(ARN).unwrap(), KeyRef::KeyArn(ARN.into()));
        assert_eq!(
            KeyRef::parse("arn:aws-us-gov:kms:us-gov-west-1:123456789012:key/abc").unwrap(),
            KeyRef::KeyArn("arn:aws-us-gov:kms:us-gov-west-1:123456789012:key/abc".into())
        );
        assert!(is_key_arn(ARN));
        assert!(!is_key_arn("alias/backups"));
        assert!(!is_key_arn("1234abcd-12ab-34cd-56ef-1234567890ab"));
    }

    #[test]
    fn malformed_key_names_are_refused_before_any_call() {
        for bad in [
            "",
            "alias/",
            " alias/x",
            "arn:aws:kms:us-east-1:123456789012",
            "arn:aws:s3:us-east-1:123456789012:key/abc",
            "arn:aws:kms::123456789012:key/abc",
            "arn:aws:kms:us-east-1:123456789012:key/",
            "arn:aws:kms:us-east-1:123456789012:grant/abc",
            "key/abc",
            "aws:kms",
        ] {
            let err = KeyRef::parse(bad).unwrap_err();
            assert!(matches!(err, KmsError::Invalid { .. }), "{bad:?}: {err}");
            assert_eq!(err.kind(), ErrorKind::InvalidInput);
        }
    }

    #[test]
    fn only_enabled_symmetric_encryption_keys_are_usable() {
        let ok = check_usable(
            "k",
            ARN,
            Some(&KeyState::Enabled),
            Some(&KeySpec::SymmetricDefault),
            Some(&KeyUsageType::EncryptDecrypt),
        );
        assert!(ok.is_ok());
        assert!(check_usable("k", ARN, Some(&KeyState::Enabled), None, None).is_ok());
        for state in [
            KeyState::Disabled,
            KeyState::PendingDeletion,
            KeyState::PendingImport,
        ] {
            let err = check_usable("alias/x", ARN, Some(&state), None, None).unwrap_err();
            let text = err.to_string();
            assert!(text.contains("alias/x") && text.contains(ARN), "{text}");
            assert!(text.contains(state.as_str()), "{text}");
        }
        let err = check_usable(
            "k",
            ARN,
            Some(&KeyState::Enabled),
            Some(&KeySpec::Rsa2048),
            Some(&KeyUsageType::SignVerify),
        )
        .unwrap_err();
        assert!(matches!(err, KmsError::NotSymmetric { .. }), "{err}");
        assert!(err.to_string().contains("RSA_2048"), "{err}");
    }

    #[test]
    fn errors_keep_their_kind_in_the_importer_error() {
        let e: crate::Error = KmsError::NotFound {
            key: "alias/x".into(),
            region: "us-east-1".into(),
        }
        .into();
        assert_eq!(e.kind(), ErrorKind::NotFound);
        assert!(e.to_string().contains("alias/x"), "{e}");
        let e: crate::Error = KmsError::NotEnabled {
            key: "k".into(),
            arn: ARN.into(),
            state: "Disabled".into(),
        }
        .into();
        assert_eq!(e.kind(), ErrorKind::InvalidInput);
    }
}
