//! S3 as a place images come from and go to: `s3://bucket/key` addresses ([`S3Url`]), random
//! reads of an object through ranged GETs ([`S3ReadAt`], [`S3Fs`]) so any format the
//! disk-image library reads is read from S3 without downloading it, and multipart staging
//! of a local file ([`stage()`]) or of bytes written by a synchronous writer
//! ([`MultipartWriter`], for image writers that stream straight into S3).

mod multipart_writer;
mod read;
mod stage;
mod url;

pub use multipart_writer::{MultipartWriter, MultipartWriterOptions};
pub use read::{S3Fs, S3ReadAt};
pub use stage::{
    DEFAULT_CONCURRENCY as DEFAULT_STAGE_CONCURRENCY, StageOptions, StageReport, choose_part_size,
    stage,
};
pub use url::S3Url;
