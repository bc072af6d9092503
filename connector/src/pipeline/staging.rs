//! Where a run stages its export in S3, and the clean-up that keeps S3 from holding (and
//! billing) what a run no longer needs: multipart uploads a killed connector left open,
//! and the images of a run once they are in EBS.

use anyhow::{Context, Result};
use rehost_importer::aws::Clients;
use rehost_importer::s3::S3Url;

use crate::config::AwsConfig;
use crate::jobs::model::{JobId, RunId};

/// `s3://bucket/<staging_prefix><job>/<run>/`: one folder per run, so an incremental
/// run's delta images name their parents by a path that stays valid, and a run's
/// leftovers are found by prefix.
pub fn run_prefix(aws: &AwsConfig, job: &JobId, run: &RunId) -> Result<(String, String)> {
    let bucket = aws.staging_bucket.clone().context(
        "[aws] staging_bucket is not set in the config: replication runs stage their images there",
    )?;
    Ok((bucket, format!("{}{job}/{run}/", aws.staging_prefix)))
}

/// Aborts the multipart uploads still open under `prefix` (a connector killed while it
/// streamed an image leaves one; S3 bills its parts until aborted). Returns how many.
pub async fn abort_open_uploads(clients: &Clients, bucket: &str, prefix: &str) -> Result<usize> {
    let mut aborted = 0;
    let mut key_marker: Option<String> = None;
    let mut upload_marker: Option<String> = None;
    loop {
        let page = clients
            .s3
            .list_multipart_uploads()
            .bucket(bucket)
            .prefix(prefix)
            .set_key_marker(key_marker.clone())
            .set_upload_id_marker(upload_marker.clone())
            .send()
            .await
            .with_context(|| format!("listing open uploads under s3://{bucket}/{prefix}"))?;
        for upload in page.uploads() {
            let (Some(key), Some(id)) = (upload.key(), upload.upload_id()) else {
                continue;
            };
            clients
                .s3
                .abort_multipart_upload()
                .bucket(bucket)
                .key(key)
                .upload_id(id)
                .send()
                .await
                .with_context(|| format!("aborting the open upload of s3://{bucket}/{key}"))?;
            tracing::info!(
                bucket,
                key,
                "aborted a multipart upload left by an earlier attempt"
            );
            aborted += 1;
        }
        if page.is_truncated() != Some(true) {
            return Ok(aborted);
        }
        key_marker = page.next_key_marker().map(str::to_owned);
        upload_marker = page.next_upload_id_marker().map(str::to_owned);
        if key_marker.is_none() && upload_marker.is_none() {
            return Ok(aborted);
        }
    }
}

/// Empties a run's staging folder: its open uploads aborted, its objects deleted.
pub async fn clear_run(clients: &Clients, bucket: &str, prefix: &str) -> Result<()> {
    abort_open_uploads(clients, bucket, prefix).await?;
    delete_prefix(clients, bucket, prefix).await
}

/// Deletes every object under `prefix` (what an interrupted attempt of a run wrote).
pub async fn delete_prefix(clients: &Clients, bucket: &str, prefix: &str) -> Result<()> {
    let mut pages = clients
        .s3
        .list_objects_v2()
        .bucket(bucket)
        .prefix(prefix)
        .into_paginator()
        .send();
    while let Some(page) = pages.next().await {
        let page = page.with_context(|| format!("listing s3://{bucket}/{prefix}"))?;
        for object in page.contents() {
            let Some(key) = object.key() else { continue };
            clients
                .s3
                .delete_object()
                .bucket(bucket)
                .key(key)
                .send()
                .await
                .with_context(|| format!("deleting s3://{bucket}/{key}"))?;
            tracing::info!(bucket, key, "deleted what an earlier attempt staged");
        }
    }
    Ok(())
}

/// Deletes the objects at `locations` (`s3://bucket/key`); one already gone is fine.
pub async fn delete_objects(clients: &Clients, locations: &[String]) -> Result<()> {
    for location in locations {
        let url = S3Url::parse(location)?;
        clients
            .s3
            .delete_object()
            .bucket(&url.bucket)
            .key(&url.key)
            .send()
            .await
            .with_context(|| format!("deleting the staged image {location}"))?;
        tracing::info!(location, "deleted a staged image");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_stages_under_its_job_and_run() {
        let aws = AwsConfig {
            staging_bucket: Some("b".into()),
            staging_prefix: "rehost/".into(),
            ..AwsConfig::default()
        };
        let (bucket, prefix) =
            run_prefix(&aws, &JobId("sms-job-1".into()), &RunId("sms-run-2".into())).unwrap();
        assert_eq!(
            (bucket.as_str(), prefix.as_str()),
            ("b", "rehost/sms-job-1/sms-run-2/")
        );
        let err = run_prefix(
            &AwsConfig::default(),
            &JobId("j".into()),
            &RunId("r".into()),
        )
        .unwrap_err();
        assert!(err.to_string().contains("staging_bucket"), "{err}");
    }
}
