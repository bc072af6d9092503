//! How commands print: a human table by default, JSON for scripts.

use clap::ValueEnum;
use serde::Serialize;

/// `--output` of every command.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum)]
pub enum OutputMode {
    /// Aligned text for people.
    #[default]
    Table,
    /// One JSON document on stdout.
    Json,
}

/// Prints `value` as pretty JSON on stdout.
pub fn print_json(value: &impl Serialize) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}
