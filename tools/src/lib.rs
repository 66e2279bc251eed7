//! The library behind `lsiommu` and `vfio-bind`: IOMMU groups and PCI devices read from sysfs, strictly
//! parsed PCI addresses, and binding devices to `vfio-pci` with safeguards and a recorded way back.
//!
//! Everything reads and writes under the roots of a [`Host`]: [`Host::system`] is the running
//! machine (`/sys`, `/proc`, `/dev`); [`Host::under`] takes another root, which is how the tests run
//! against a fake sysfs tree.
//!
//! ```no_run
//! use iommufd_tools::{BindOptions, Host, StateFile, bind};
//!
//! # fn main() -> Result<(), iommufd_tools::Error> {
//! let host = Host::system();
//! let devices = ["0000:3b:00.1".parse()?];
//! let plan = bind::plan(&host, &devices, BindOptions::default())?; // refuses unsafe requests
//! print!("{}", plan.describe());
//! let state = StateFile::new("/run/iommufd-tools/vfio-bind.state");
//! let bound = bind::bind(&host, &plan, &state)?;
//! // ... use the devices through VFIO ...
//! bound.restore()?; // the original drivers again (also done, best effort, if `bound` is dropped)
//! # Ok(())
//! # }
//! ```
#![deny(unsafe_op_in_unsafe_fn)]

pub mod bdf;
pub mod bind;
pub mod json;
pub mod report;
pub mod sysfs;

pub use bdf::Bdf;
pub use bind::{BindOptions, Bound, Plan, Record, StateFile};
pub use sysfs::{Group, GroupMember, Host, IommuUnit, PciDevice};

use std::fmt;
use std::path::Path;

/// The errors of the tools.
#[derive(Debug)]
#[non_exhaustive]
pub enum Error {
    /// An argument or a recorded value is malformed (nothing was touched).
    Invalid(String),
    /// Reading or writing a file failed.
    Io {
        /// What was being done, with the path.
        what: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A safeguard refused the request (nothing was touched); each entry is one reason. `--force`
    /// ([`BindOptions::force`]) overrides them.
    Refused(Vec<String>),
    /// A bind or restore did not reach the expected state (the message says what was left how).
    Failed(String),
}

impl Error {
    pub(crate) fn io(what: impl fmt::Display, path: &Path, source: std::io::Error) -> Error {
        Error::Io { what: format!("{what} {}", path.display()), source }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Invalid(m) | Error::Failed(m) => f.write_str(m),
            Error::Io { what, source } => write!(f, "{what}: {source}"),
            Error::Refused(reasons) => {
                write!(f, "refused (--force overrides):")?;
                for r in reasons {
                    write!(f, "\n  - {r}")?;
                }
                Ok(())
            }
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}

/// The tools' result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod fake;
