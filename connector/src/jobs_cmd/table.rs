//! Aligned tables of jobs and runs, for people (`--output table`).

use indicatif::HumanBytes;

use crate::api::responses::{ReplicationJob, ReplicationRun, serde_name};

/// Prints `rows` under `headers`, each column as wide as its widest cell.
pub fn print_table(headers: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let text: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect();
        println!("{}", text.join("  ").trim_end());
    };
    line(headers.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
}

fn or_dash(value: Option<impl ToString>) -> String {
    value.map_or_else(|| "-".to_owned(), |v| v.to_string())
}

/// `jobs list`.
pub fn print_jobs(jobs: &[ReplicationJob]) {
    let rows: Vec<Vec<String>> = jobs
        .iter()
        .map(|j| {
            vec![
                j.replication_job_id.to_string(),
                j.vm_server.vm_name.clone(),
                serde_name(&j.state),
                if j.run_once {
                    "once".to_owned()
                } else {
                    or_dash(j.frequency.map(|h| format!("{h}h")))
                },
                or_dash(j.next_replication_run_start_time),
                or_dash(j.latest_ami_id.as_ref()),
                or_dash(j.description.as_ref()),
            ]
        })
        .collect();
    print_table(
        &[
            "JOB",
            "SERVER",
            "STATE",
            "EVERY",
            "NEXT_RUN",
            "LATEST_AMI",
            "DESCRIPTION",
        ],
        &rows,
    );
}

/// `jobs show`: the job's fields, one per line.
pub fn print_job(job: &ReplicationJob) {
    let fields = [
        ("job", job.replication_job_id.to_string()),
        (
            "server",
            format!("{} ({})", job.vm_server.vm_name, job.server_id),
        ),
        ("source", job.vm_server.vm_manager_name.clone()),
        ("state", serde_name(&job.state)),
        ("status", or_dash(job.status_message.as_ref())),
        ("seed time", job.seed_replication_time.to_string()),
        (
            "frequency",
            if job.run_once {
                "run once".to_owned()
            } else {
                or_dash(job.frequency.map(|h| format!("every {h} h")))
            },
        ),
        ("next run", or_dash(job.next_replication_run_start_time)),
        ("license", serde_name(&job.license_type)),
        ("AMIs kept", job.number_of_recent_amis_to_keep.to_string()),
        (
            "encrypted",
            match (&job.kms_key_id, job.encrypted) {
                (Some(key), _) => format!("yes ({key})"),
                (None, true) => "yes".to_owned(),
                (None, false) => "no".to_owned(),
            },
        ),
        ("latest AMI", or_dash(job.latest_ami_id.as_ref())),
        ("description", or_dash(job.description.as_ref())),
    ];
    for (name, value) in fields {
        println!("{:<12} {value}", format!("{name}:"));
    }
}

/// `runs list` and the runs of `jobs show`.
pub fn print_runs(runs: &[ReplicationRun]) {
    let rows: Vec<Vec<String>> = runs
        .iter()
        .map(|r| {
            vec![
                r.replication_run_id.to_string(),
                serde_name(&r.run_type),
                serde_name(&r.state),
                r.stage_details.stage.clone(),
                format!("{}%", r.progress_percent),
                HumanBytes(r.bytes_moved).to_string(),
                r.scheduled_start_time.to_string(),
                or_dash(r.completed_time),
                or_dash(r.ami_id.as_ref()),
                or_dash(r.status_message.as_ref()),
            ]
        })
        .collect();
    print_table(
        &[
            "RUN",
            "TYPE",
            "STATE",
            "STAGE",
            "DONE",
            "MOVED",
            "SCHEDULED",
            "COMPLETED",
            "AMI",
            "STATUS",
        ],
        &rows,
    );
}
