//! The connector appliance, as rehost builds and deploys it: the typed manifest
//! (`appliance.toml`), the OVF descriptor rendered from the checked-in template
//! (`ovf/rehost-appliance.ovf.in`), OVA archives written and read (tar in the order OVF
//! requires, a SHA-256 `.mf`), and the size rules of each hypervisor's format.
//!
//! The root filesystem and the bootable raw disk are made by `build.sh` (debootstrap and
//! friends); `rehost appliance package` turns that disk into the OVA, VHDX and VHD with
//! rehost's own image writers and this crate; `rehost appliance deploy` reads the OVA.

pub mod descriptor;
pub mod error;
pub mod manifest;
pub mod ova;
pub mod ovf;
pub mod sizes;

pub use error::{Error, Result};
pub use manifest::Manifest;
