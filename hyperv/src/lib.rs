//! The Hyper-V source: a WS-Management client of the Hyper-V WMI classes
//! (`root/virtualization/v2`), the host's recovery checkpoints and RCT reference points,
//! and the frozen disk files read at random offsets over SMB by the disk-image library.
//!
//! - [`wsman`]: the messages (pure); [`xml`]: the namespace-keyed tree they are read into;
//! - [`transport`]: HTTP(S) with NTLM (sealed over plain HTTP, as WinRM requires) or Basic;
//! - [`client`]: Get, Enumerate/Pull, Invoke and job waiting; [`host`]: the `Msvm_*` model;
//! - [`files`]: Windows paths on administrative shares; [`smb`]: the SMB session;
//! - [`source`]: the [`rehost_core::Source`] trait.

pub mod client;
pub mod error;
pub mod files;
pub mod host;
pub mod ntlm_seal;
pub mod smb;
pub mod source;
pub mod transport;
pub mod wsman;
pub mod xml;

pub use client::Client;
pub use error::{Error, Result};
pub use source::HypervSource;
