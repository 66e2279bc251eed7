//! PCI addresses, parsed strictly: a value that names a sysfs path must be nothing but an address.

use std::fmt;
use std::str::FromStr;

use crate::Error;

/// A PCI address `domain:bus:device.function` in the form sysfs names devices (`0000:00:03.0`).
///
/// [`FromStr`] accepts exactly that form: a domain of 4 to 8 hex digits (sysfs prints at least 4), a bus
/// of 2, a device of 2 (below `0x20`) and a function of 1 (below 8), nothing before, between or after
/// them. So an accepted value can never be a path (`..`, `/`), an abbreviation that names another
/// device, or carry whitespace or a sign. Upper-case hex digits are accepted; [`Display`](fmt::Display)
/// prints lower case, as sysfs does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Bdf {
    /// PCI domain (segment).
    pub domain: u32,
    /// Bus number.
    pub bus: u8,
    /// Device number (0..32).
    pub device: u8,
    /// Function number (0..8).
    pub function: u8,
}

/// `digits` hex digits (`min..=max` of them) as a number, or `None` for anything else.
fn hex(s: &str, min: usize, max: usize) -> Option<u32> {
    if s.len() < min || s.len() > max || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    u32::from_str_radix(s, 16).ok()
}

impl FromStr for Bdf {
    type Err = Error;

    fn from_str(s: &str) -> Result<Bdf, Error> {
        let bad = |why: &str| {
            Error::Invalid(format!("{s:?} is not a PCI address (want domain:bus:device.function, {why})"))
        };
        let mut colon = s.split(':');
        let (Some(domain), Some(bus), Some(rest), None) =
            (colon.next(), colon.next(), colon.next(), colon.next())
        else {
            return Err(bad("e.g. 0000:00:03.0"));
        };
        let (device, function) = rest.split_once('.').ok_or_else(|| bad("missing .function"))?;
        let domain = hex(domain, 4, 8).ok_or_else(|| bad("the domain is 4 to 8 hex digits"))?;
        let bus = hex(bus, 2, 2).ok_or_else(|| bad("the bus is 2 hex digits"))?;
        let device = hex(device, 2, 2).filter(|&d| d < 0x20).ok_or_else(|| bad("the device is 00 to 1f"))?;
        let function = hex(function, 1, 1).filter(|&f| f < 8).ok_or_else(|| bad("the function is 0 to 7"))?;
        // The filters above bound every value to its type's range.
        Ok(Bdf { domain, bus: bus as u8, device: device as u8, function: function as u8 })
    }
}

impl fmt::Display for Bdf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:04x}:{:02x}:{:02x}.{:x}", self.domain, self.bus, self.device, self.function)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sysfs_names_parse_and_print_back() {
        for s in ["0000:00:03.0", "0000:3b:00.1", "ffff:ff:1f.7", "10000:00:02.0", "ffffffff:00:00.0"] {
            let b: Bdf = s.parse().unwrap();
            assert_eq!(b.to_string(), s);
        }
        let b: Bdf = "0000:3B:1F.7".parse().unwrap();
        assert_eq!(b, Bdf { domain: 0, bus: 0x3b, device: 0x1f, function: 7 });
        assert_eq!(b.to_string(), "0000:3b:1f.7", "printed as sysfs names it");
    }

    #[test]
    fn anything_else_is_refused() {
        for bad in [
            "",
            "00:03.0",           // no domain: refused, not guessed
            "0:00:03.0",         // short domain
            "000:00:03.0",       // short domain
            "100000000:00:03.0", // 9-digit domain
            "0000:0:03.0",
            "0000:000:03.0",
            "0000:00:3.0",
            "0000:00:20.0", // device 0x20
            "0000:00:03.8", // function 8
            "0000:00:03.00",
            "0000:00:03",
            "0000:00:03.",
            "0000:00:03.0\n",
            " 0000:00:03.0",
            "0000:00:03.0/..",
            "../0000:00:03.0",
            "0000:00:03.0/../../../../kernel",
            "..",
            "0000:+0:03.0",
            "0000:00:+3.0",
            "+000:00:03.0",
            "0000:00:03.0:0",
            "0000:00:03:0",
            "0x00:00:03.0",
            "0000:00:0g.0",
            "0000:00:03.0\0",
            "０000:00:03.0",
        ] {
            let e = bad.parse::<Bdf>().unwrap_err();
            assert!(e.to_string().contains("not a PCI address"), "{bad:?}: {e}");
        }
    }
}
