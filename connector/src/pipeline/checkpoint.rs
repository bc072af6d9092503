//! What a run has finished, persisted after every step so that a connector restarted after
//! a crash (or a SIGKILL) resumes the run where it was instead of redoing or duplicating
//! work: an export that completed is not taken again, a snapshot imported is not imported
//! again, an AMI registered is found again (by its name) rather than registered twice.

use std::collections::BTreeMap;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::export::manifest::Manifest;

/// A run's progress through its steps (stored as JSON in the run's row).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Checkpoint {
    /// The export, once every disk's image and the manifest are in S3.
    pub export: Option<StagedExport>,
    /// Per disk key: its imported, completed EBS snapshot.
    #[serde(default)]
    pub snapshots: BTreeMap<String, ImportedDisk>,
    /// The boot mode and architecture of the root disk (`uefi`/`legacy-bios`,
    /// `x86_64`/`arm64`), read from its full image on a full run and carried over from
    /// the previous run on an incremental one (a delta image alone cannot tell).
    pub boot: Option<(String, String)>,
    /// The AMI, once registered.
    pub ami_id: Option<String>,
    /// Retention has run for this run's AMI.
    #[serde(default)]
    pub retention_done: bool,
    /// The staged images were deleted (or kept, as the config says).
    #[serde(default)]
    pub staging_done: bool,
}

/// The staged export of one run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StagedExport {
    /// `s3://bucket/prefix/job/run/….manifest.json`.
    pub manifest_location: String,
    pub manifest: Manifest,
    /// The images, in manifest order.
    pub image_locations: Vec<String>,
}

/// One disk's EBS snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImportedDisk {
    pub snapshot_id: String,
    pub volume_size_gib: i64,
    pub blocks_written: u64,
    pub parent_snapshot_id: Option<String>,
}

impl Checkpoint {
    /// Reads a stored checkpoint; none stored is a run that has not started a step.
    pub fn parse(json: Option<&str>) -> Result<Checkpoint> {
        match json {
            None => Ok(Checkpoint::default()),
            Some(text) => serde_json::from_str(text).context(
                "the run's stored checkpoint is not valid (written by another rehost version?)",
            ),
        }
    }

    /// As stored.
    pub fn to_json(&self) -> Result<String> {
        Ok(serde_json::to_string(self)?)
    }

    /// The disks still to import, in manifest order.
    pub fn disks_to_import(&self) -> Vec<String> {
        self.export
            .as_ref()
            .map(|e| {
                e.manifest
                    .disks
                    .iter()
                    .map(|d| d.key.clone())
                    .filter(|key| !self.snapshots.contains_key(key))
                    .collect()
            })
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_checkpoint_is_a_fresh_run_and_a_stored_one_round_trips() {
        let fresh = Checkpoint::parse(None).unwrap();
        assert_eq!(fresh, Checkpoint::default());
        assert!(fresh.disks_to_import().is_empty());
        let mut done = Checkpoint {
            ami_id: Some("ami-1".into()),
            boot: Some(("uefi".into(), "x86_64".into())),
            ..Checkpoint::default()
        };
        done.snapshots.insert(
            "2000".into(),
            ImportedDisk {
                snapshot_id: "snap-1".into(),
                volume_size_gib: 1,
                blocks_written: 3,
                parent_snapshot_id: None,
            },
        );
        let json = done.to_json().unwrap();
        assert_eq!(Checkpoint::parse(Some(&json)).unwrap(), done);
    }

    #[test]
    fn a_corrupt_checkpoint_is_an_error_not_a_fresh_start() {
        let err = Checkpoint::parse(Some("{\"export\": 3}")).unwrap_err();
        assert!(
            format!("{err:#}").contains("checkpoint is not valid"),
            "{err:#}"
        );
    }
}
