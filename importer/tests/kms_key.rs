//! `--kms-key-id` against the strict moto emulator's KMS: every way of naming a key resolves
//! to its ARN, the snapshot is encrypted with that key, and missing, disabled or
//! pending-deletion keys are refused before anything is uploaded, naming the key.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use common::{Faults, Moto};
use rehost_core::ErrorKind;
use rehost_diskimage::Disk;
use rehost_importer::aws::{aws_sdk_kms, sdk_config};
use rehost_importer::ebs::journal::{JournalLocation, SourceIdentity};
use rehost_importer::ebs::retry::RetryPolicy;
use rehost_importer::ebs::uploader::Encryption;
use rehost_importer::import::{ImportOptions, ImportStatus, import};
use rehost_importer::kms::{KeyResolver, KmsError};

const BLOCK: usize = 512 * 1024;

async fn kms_client(moto: &Moto) -> aws_sdk_kms::Client {
    aws_sdk_kms::Client::new(&sdk_config(&moto.options()).await)
}

/// A new symmetric key with `alias`; returns (key id, key ARN).
async fn create_key(kms: &aws_sdk_kms::Client, alias: &str) -> (String, String) {
    let meta = kms
        .create_key()
        .description("rehost test")
        .send()
        .await
        .unwrap()
        .key_metadata
        .unwrap();
    kms.create_alias()
        .alias_name(alias)
        .target_key_id(&meta.key_id)
        .send()
        .await
        .unwrap();
    (meta.key_id.clone(), meta.arn.clone().unwrap())
}

fn fast_retry() -> RetryPolicy {
    RetryPolicy {
        max_attempts: 10,
        base_delay: Duration::from_millis(5),
        max_delay: Duration::from_millis(50),
    }
}

fn requests(moto: &Moto, op: &str) -> u64 {
    moto.stats()["requests"][op].as_u64().unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_key_id_alias_alias_arn_or_key_arn_resolve_to_the_key_arn() {
    let moto = Moto::start();
    let kms = kms_client(&moto).await;
    let (key_id, key_arn) = create_key(&kms, "alias/rehost-backups").await;
    // Another key, so that resolving cannot succeed by picking "the" key.
    let (_, other_arn) = create_key(&kms, "alias/rehost-other").await;
    assert_ne!(key_arn, other_arn);
    let alias_arn = key_arn.replace(&format!("key/{key_id}"), "alias/rehost-backups");
    assert!(alias_arn.contains(":alias/rehost-backups"), "{alias_arn}");

    let resolver = KeyResolver::new(&kms, RetryPolicy::default());
    for name in [
        key_id.as_str(),
        "alias/rehost-backups",
        &alias_arn,
        &key_arn,
    ] {
        let resolved = resolver.resolve(name).await.unwrap();
        assert_eq!(resolved.arn, key_arn, "{name}");
        assert_eq!(resolved.key_id, key_id, "{name}");
        assert_eq!(resolved.given, name);
    }
    assert_eq!(
        resolver.resolve("alias/rehost-other").await.unwrap().arn,
        other_arn
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_missing_disabled_or_deleted_key_is_refused_naming_it() {
    let moto = Moto::start();
    let kms = kms_client(&moto).await;
    let resolver = KeyResolver::new(&kms, RetryPolicy::default());

    let err = resolver.resolve("alias/no-such-key").await.unwrap_err();
    assert!(matches!(err, KmsError::NotFound { .. }), "{err}");
    assert_eq!(err.kind(), ErrorKind::NotFound);
    let text = err.to_string();
    assert!(
        text.contains("alias/no-such-key") && text.contains("us-east-1"),
        "{text}"
    );
    let missing_arn = "arn:aws:kms:us-east-1:123456789012:key/00000000-0000-0000-0000-000000000000";
    let err = resolver.resolve(missing_arn).await.unwrap_err();
    assert!(matches!(err, KmsError::NotFound { .. }), "{err}");

    let (key_id, key_arn) = create_key(&kms, "alias/rehost-disabled").await;
    kms.disable_key().key_id(&key_id).send().await.unwrap();
    let err = resolver.resolve("alias/rehost-disabled").await.unwrap_err();
    assert!(matches!(err, KmsError::NotEnabled { .. }), "{err}");
    assert_eq!(err.kind(), ErrorKind::InvalidInput);
    let text = err.to_string();
    assert!(
        text.contains("alias/rehost-disabled")
            && text.contains(&key_arn)
            && text.contains("Disabled"),
        "{text}"
    );
    // Enabled again, it resolves: the refusal was about the state, not the name.
    kms.enable_key().key_id(&key_id).send().await.unwrap();
    assert_eq!(
        resolver.resolve(&key_id).await.unwrap().arn,
        key_arn,
        "re-enabled"
    );

    let (key_id, _) = create_key(&kms, "alias/rehost-deleted").await;
    kms.schedule_key_deletion()
        .key_id(&key_id)
        .pending_window_in_days(7)
        .send()
        .await
        .unwrap();
    let err = resolver.resolve(&key_id).await.unwrap_err();
    assert!(err.to_string().contains("PendingDeletion"), "{err}");

    // A malformed name never reaches KMS.
    let before = requests(&moto, "kms:DescribeKey");
    let err = resolver
        .resolve("arn:aws:kms:us-east-1:123456789012:grant/x")
        .await
        .unwrap_err();
    assert!(matches!(err, KmsError::Invalid { .. }), "{err}");
    assert_eq!(requests(&moto, "kms:DescribeKey"), before);
}

#[tokio::test(flavor = "multi_thread")]
async fn describe_key_is_retried_through_throttling_and_5xx() {
    let moto = Moto::start_with(&Faults {
        rate: 0.5,
        seed: 7,
        services: "kms".into(),
        new_snapshot_invisible_ms: 0,
    });
    let kms = kms_client(&moto).await;
    // CreateKey and CreateAlias get faults too: the SDK's own retries carry them through
    // (this client is the plain one), ours carry DescribeKey.
    let mut created = None;
    for _ in 0..20 {
        if let Ok(out) = kms.create_key().send().await {
            created = out.key_metadata;
            break;
        }
    }
    let meta = created.expect("CreateKey through faults");
    let resolver = KeyResolver::new(&kms, fast_retry());
    for _ in 0..5 {
        let resolved = resolver.resolve(&meta.key_id).await.unwrap();
        assert_eq!(Some(resolved.arn.as_str()), meta.arn());
    }
    let stats = moto.stats();
    let faults = stats["faults_total"].as_u64().unwrap_or(0);
    assert!(faults > 0, "no faults injected: {stats}");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_snapshot_is_encrypted_with_the_resolved_key_and_an_unresolved_name_is_refused() {
    let moto = Moto::start();
    let clients = moto.clients().await;
    let kms = kms_client(&moto).await;
    let (_, key_arn) = create_key(&kms, "alias/rehost-snapshots").await;

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk.raw");
    let mut content = vec![0u8; 4 * BLOCK];
    content[BLOCK..2 * BLOCK].fill(0x5a);
    std::fs::write(&path, &content).unwrap();
    let disk = Disk::open(path.to_str().unwrap()).unwrap();
    let mut options = ImportOptions::new(
        SourceIdentity::local(&path).unwrap(),
        JournalLocation {
            dir: dir.path().to_path_buf(),
            file: None,
        },
    );
    options.wait_timeout = Duration::from_secs(60);

    // An alias handed straight to the importer is refused before StartSnapshot.
    options.encryption = Encryption::Encrypted {
        kms_key_arn: Some("alias/rehost-snapshots".into()),
    };
    let err = import(&clients, &disk, &options).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidInput, "{err}");
    assert!(err.to_string().contains("alias/rehost-snapshots"), "{err}");
    assert_eq!(requests(&moto, "ebs:StartSnapshot"), 0);

    let resolved = KeyResolver::new(&kms, RetryPolicy::default())
        .resolve("alias/rehost-snapshots")
        .await
        .unwrap();
    options.encryption = Encryption::Encrypted {
        kms_key_arn: Some(resolved.arn.clone()),
    };
    // Stopped right after StartSnapshot: the key is chosen there, and an encrypted import
    // writes all 2,048 blocks of the volume, which the emulator takes half a minute for.
    options.cancel = Some(Arc::new(AtomicBool::new(true)));
    let report = import(&clients, &disk, &options).await.unwrap();
    assert_eq!(report.status, ImportStatus::Interrupted);
    assert!(report.encrypted);
    assert_eq!(report.kms_key_arn.as_deref(), Some(key_arn.as_str()));
    let described = clients
        .ec2
        .describe_snapshots()
        .snapshot_ids(&report.snapshot_id)
        .send()
        .await
        .unwrap();
    let snapshot = &described.snapshots()[0];
    assert_eq!(snapshot.encrypted(), Some(true));
    assert_eq!(snapshot.kms_key_id(), Some(key_arn.as_str()));
}
