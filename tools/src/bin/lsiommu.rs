//! `lsiommu [--json]`: every IOMMU group with its devices and their drivers, the IOMMU behind each
//! group, and what the running kernel's iommufd supports.

use iommufd_tools::Host;
use iommufd_tools::report::{self, Report};

const USAGE: &str = "\
usage: lsiommu [--json]
  Lists every IOMMU group (`IOMMU Group N  ADDRESS  class [vendor:device]  driver`), the IOMMU unit and
  driver behind the groups, whether vfio-pci and VFIO device cdevs are available, and which iommufd
  ioctls and features the running kernel supports (probed without side effects). Works without
  /dev/iommu (it says so). --json prints the same as one JSON document.
";

fn main() {
    let mut json = false;
    for arg in std::env::args().skip(1) {
        match arg.as_str() {
            "--json" => json = true,
            "-h" | "--help" => {
                print!("{USAGE}");
                return;
            }
            other => {
                eprint!("lsiommu: unknown argument {other:?}\n{USAGE}");
                std::process::exit(2);
            }
        }
    }
    match Report::scan(&Host::system(), report::probe()) {
        Ok(r) if json => print!("{}", r.json().to_pretty()),
        Ok(r) => print!("{}", r.text()),
        Err(e) => {
            eprintln!("lsiommu: {e}");
            std::process::exit(1);
        }
    }
}
