//! The importer: turns any disk image the disk-image library reads, from a local file or
//! S3, into a verified EBS snapshot (through the EBS direct APIs, writing only blocks that
//! hold data or changed) and a bootable AMI.
//!
//! AWS clients are passed in (see [`aws::Clients`]) so tests point them at the local
//! emulator; the pure parts (which blocks to send, checksums) are apart from the I/O.

pub mod ami;
pub mod aws;
pub mod blocks;
pub mod bootinfo;
pub mod ebs;
pub mod error;
pub mod import;
pub mod kms;
pub mod retry;
pub mod s3;
pub mod verify;

pub use error::{Error, Result};
