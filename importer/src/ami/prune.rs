//! Retention of our AMIs: keep the newest N carrying a tag, deregister the rest and delete
//! their snapshots, except snapshots any remaining AMI still maps.

use std::collections::{BTreeMap, BTreeSet};
use std::str::FromStr;

use aws_sdk_ec2::types::{Filter, Image};

use super::ec2_error;
use crate::aws::Clients;
use crate::{Error, Result};

/// `KEY=VALUE`: the tag selecting the AMIs a retention rule applies to.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct TagFilter {
    /// Tag key.
    pub key: String,
    /// Tag value.
    pub value: String,
}

impl FromStr for TagFilter {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s.split_once('=') {
            Some((key, value)) if !key.is_empty() => Ok(Self {
                key: key.to_owned(),
                value: value.to_owned(),
            }),
            _ => Err(Error::InvalidInput(format!("tag {s:?} is not KEY=VALUE"))),
        }
    }
}

/// An AMI as retention sees it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct PruneAmi {
    /// `ami-…`.
    pub image_id: String,
    /// Its name.
    pub name: String,
    /// ISO 8601 (`2026-11-25T14:00:00.000Z`), which sorts as text.
    pub creation_date: String,
    /// The snapshots its block device mappings name.
    pub snapshot_ids: Vec<String>,
}

impl PruneAmi {
    fn from_image(image: &Image) -> Self {
        Self {
            image_id: image.image_id().unwrap_or_default().to_owned(),
            name: image.name().unwrap_or_default().to_owned(),
            creation_date: image.creation_date().unwrap_or_default().to_owned(),
            snapshot_ids: image
                .block_device_mappings()
                .iter()
                .filter_map(|m| m.ebs().and_then(|e| e.snapshot_id()).map(str::to_owned))
                .collect(),
        }
    }
}

/// A snapshot of a deregistered AMI that stays because other AMIs map it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct RetainedSnapshot {
    /// `snap-…`.
    pub snapshot_id: String,
    /// The AMIs still mapping it.
    pub used_by: Vec<String>,
}

/// What a prune does (or, with `--dry-run`, would do).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct PrunePlan {
    /// The newest N tagged AMIs, newest first.
    pub keep: Vec<PruneAmi>,
    /// The older tagged AMIs, newest first.
    pub deregister: Vec<PruneAmi>,
    /// Snapshots of deregistered AMIs that no remaining AMI maps.
    pub delete_snapshots: Vec<String>,
    /// Snapshots of deregistered AMIs that stay.
    pub retained_snapshots: Vec<RetainedSnapshot>,
}

/// The outcome of [`prune`].
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct PruneReport {
    /// The tag the AMIs were selected by.
    pub tag: TagFilter,
    /// How many were to be kept.
    pub keep_count: usize,
    /// Nothing was changed.
    pub dry_run: bool,
    /// What was (or would be) done.
    #[serde(flatten)]
    pub plan: PrunePlan,
}

/// Decides, from the tagged AMIs and every AMI of the account (tagged or not), which to
/// deregister and which of their snapshots may go: a snapshot is deleted only if no AMI
/// left after the prune maps it.
pub fn plan_prune(tagged: Vec<PruneAmi>, all: &[PruneAmi], keep: usize) -> PrunePlan {
    plan_prune_ranked(tagged, all, keep, &[])
}

/// [`plan_prune`], with `newest`: AMI ids the caller knows to be the newest, newest first
/// (the connector knows the order of its runs), ranked before every other AMI. Creation
/// dates alone cannot order AMIs registered within the same second, and the AMI a run has
/// just registered must never be the one pruned.
pub fn plan_prune_ranked(
    mut tagged: Vec<PruneAmi>,
    all: &[PruneAmi],
    keep: usize,
    newest: &[String],
) -> PrunePlan {
    let rank = |ami: &PruneAmi| {
        newest
            .iter()
            .position(|id| *id == ami.image_id)
            .unwrap_or(usize::MAX)
    };
    // Newest first; the id breaks ties so the plan is the same on every run.
    tagged.sort_by(|a, b| {
        rank(a)
            .cmp(&rank(b))
            .then_with(|| b.creation_date.cmp(&a.creation_date))
            .then_with(|| b.image_id.cmp(&a.image_id))
    });
    let deregister = tagged.split_off(keep.min(tagged.len()));
    let leaving: BTreeSet<&str> = deregister.iter().map(|a| a.image_id.as_str()).collect();
    let mut users: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    for ami in tagged.iter().chain(all) {
        if !leaving.contains(ami.image_id.as_str()) {
            for snapshot in &ami.snapshot_ids {
                users.entry(snapshot).or_default().insert(&ami.image_id);
            }
        }
    }
    let mut delete_snapshots = Vec::new();
    let mut retained_snapshots = Vec::new();
    let mut seen = BTreeSet::new();
    for snapshot in deregister.iter().flat_map(|a| &a.snapshot_ids) {
        if !seen.insert(snapshot.as_str()) {
            continue;
        }
        match users.get(snapshot.as_str()) {
            Some(by) => retained_snapshots.push(RetainedSnapshot {
                snapshot_id: snapshot.clone(),
                used_by: by.iter().map(|s| (*s).to_owned()).collect(),
            }),
            None => delete_snapshots.push(snapshot.clone()),
        }
    }
    PrunePlan {
        keep: tagged,
        deregister,
        delete_snapshots,
        retained_snapshots,
    }
}

/// Keeps the newest `keep` of our AMIs tagged `tag`, deregisters the others and deletes
/// their snapshots unless an AMI left after the prune maps them. With `dry_run`, only
/// reports what it would do.
pub async fn prune(
    clients: &Clients,
    tag: &TagFilter,
    keep: usize,
    dry_run: bool,
) -> Result<PruneReport> {
    prune_ranked(clients, tag, keep, &[], dry_run).await
}

/// [`prune`], with the AMIs known to be the newest first (see [`plan_prune_ranked`]).
pub async fn prune_ranked(
    clients: &Clients,
    tag: &TagFilter,
    keep: usize,
    newest: &[String],
    dry_run: bool,
) -> Result<PruneReport> {
    let tagged = list_images(clients, Some(tag)).await?;
    // Every AMI of ours, so a snapshot shared with an untagged (or differently tagged)
    // AMI is never deleted from under it.
    let all = list_images(clients, None).await?;
    let plan = plan_prune_ranked(tagged, &all, keep, newest);
    if !dry_run {
        for ami in &plan.deregister {
            clients
                .ec2
                .deregister_image()
                .image_id(&ami.image_id)
                .send()
                .await
                .map_err(|e| context(ec2_error("DeregisterImage", e), &ami.image_id))?;
            tracing::info!(image_id = %ami.image_id, name = %ami.name, "deregistered AMI");
        }
        for snapshot in &plan.delete_snapshots {
            clients
                .ec2
                .delete_snapshot()
                .snapshot_id(snapshot)
                .send()
                .await
                .map_err(|e| context(ec2_error("DeleteSnapshot", e), snapshot))?;
            tracing::info!(snapshot_id = %snapshot, "deleted snapshot");
        }
    }
    Ok(PruneReport {
        tag: tag.clone(),
        keep_count: keep,
        dry_run,
        plan,
    })
}

/// Our AMIs, all pages, optionally only those tagged `tag`.
async fn list_images(clients: &Clients, tag: Option<&TagFilter>) -> Result<Vec<PruneAmi>> {
    let mut request = clients
        .ec2
        .describe_images()
        .owners("self")
        // Deprecated and disabled AMIs still map their snapshots: they count as users too.
        .include_deprecated(true)
        .include_disabled(true);
    if let Some(tag) = tag {
        request = request.filters(
            Filter::builder()
                .name(format!("tag:{}", tag.key))
                .values(&tag.value)
                .build(),
        );
    }
    // 1,000 per page is DescribeImages' maximum: fewest calls for accounts with many AMIs.
    let mut pages = request.into_paginator().page_size(1000).send();
    let mut images = Vec::new();
    while let Some(page) = pages.next().await {
        let page = page.map_err(|e| ec2_error("DescribeImages", e))?;
        images.extend(page.images().iter().map(PruneAmi::from_image));
    }
    Ok(images)
}

/// Names the resource a call failed on.
fn context(err: Error, resource: &str) -> Error {
    match err {
        Error::Aws {
            operation,
            code,
            message,
            kind,
        } => Error::Aws {
            operation,
            code,
            message: format!("{resource}: {message}"),
            kind,
        },
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ami(id: &str, date: &str, snapshots: &[&str]) -> PruneAmi {
        PruneAmi {
            image_id: id.into(),
            name: id.into(),
            creation_date: date.into(),
            snapshot_ids: snapshots.iter().map(|s| (*s).to_owned()).collect(),
        }
    }

    fn ids(amis: &[PruneAmi]) -> Vec<&str> {
        amis.iter().map(|a| a.image_id.as_str()).collect()
    }

    #[test]
    fn amis_known_to_be_newest_outrank_creation_dates_that_tie() {
        // Registered within the same second: the dates cannot tell them apart.
        let same = "2026-12-07T16:00:00.000Z";
        let tagged = vec![
            ami("ami-b", same, &["snap-b"]),
            ami("ami-a", same, &["snap-a"]),
        ];
        let plan = plan_prune_ranked(tagged.clone(), &tagged, 1, &["ami-a".to_owned()]);
        assert_eq!(ids(&plan.keep), ["ami-a"]);
        assert_eq!(ids(&plan.deregister), ["ami-b"]);
        assert_eq!(plan.delete_snapshots, ["snap-b"]);
    }

    #[test]
    fn keeps_the_newest_and_deletes_only_unshared_snapshots() {
        let tagged = vec![
            ami(
                "ami-1",
                "2026-01-01T00:00:00.000Z",
                &["snap-a", "snap-shared"],
            ),
            ami(
                "ami-3",
                "2026-03-01T00:00:00.000Z",
                &["snap-c", "snap-shared"],
            ),
            ami(
                "ami-2",
                "2026-02-01T00:00:00.000Z",
                &["snap-b", "snap-other"],
            ),
        ];
        let untagged = ami("ami-x", "2025-01-01T00:00:00.000Z", &["snap-other"]);
        let mut all = tagged.clone();
        all.push(untagged);
        let plan = plan_prune(tagged, &all, 1);
        assert_eq!(ids(&plan.keep), ["ami-3"]);
        assert_eq!(ids(&plan.deregister), ["ami-2", "ami-1"]);
        assert_eq!(plan.delete_snapshots, ["snap-b", "snap-a"]);
        assert_eq!(
            plan.retained_snapshots,
            [
                RetainedSnapshot {
                    snapshot_id: "snap-other".into(),
                    used_by: vec!["ami-x".into()]
                },
                RetainedSnapshot {
                    snapshot_id: "snap-shared".into(),
                    used_by: vec!["ami-3".into()]
                },
            ]
        );
    }

    #[test]
    fn keeping_more_than_there_are_changes_nothing() {
        let tagged = vec![ami("ami-1", "2026-01-01T00:00:00.000Z", &["snap-a"])];
        let plan = plan_prune(tagged.clone(), &tagged, 5);
        assert_eq!(
            (
                plan.keep.len(),
                plan.deregister.len(),
                plan.delete_snapshots.len()
            ),
            (1, 0, 0)
        );
    }

    #[test]
    fn keep_zero_removes_all() {
        let tagged = vec![
            ami("ami-1", "2026-01-01T00:00:00.000Z", &["snap-a"]),
            ami("ami-2", "2026-01-02T00:00:00.000Z", &["snap-a"]),
        ];
        let plan = plan_prune(tagged.clone(), &tagged, 0);
        assert_eq!(
            (plan.deregister.len(), plan.delete_snapshots.as_slice()),
            (2, ["snap-a".to_owned()].as_slice())
        );
    }

    #[test]
    fn tags_parse_as_key_value() {
        assert_eq!(
            "a=b=c".parse::<TagFilter>().ok(),
            Some(TagFilter {
                key: "a".into(),
                value: "b=c".into()
            })
        );
        assert!("novalue".parse::<TagFilter>().is_err());
        assert!("=v".parse::<TagFilter>().is_err());
    }
}
