//! Names that become file names: VM names (`<vm>.qcow2`) and disk ids (`<vm>~<disk>.qcow2`).
//! Neither may contain `~`, which separates them in data disk names, so output names never collide
//! across VMs.
//!
//! They arrive in manifests written by other programs, so they are validated, never trusted: no
//! path separators, no `..`, nothing a program could read as an option, nothing invisible.

use std::fmt;

/// Longest VM name, in bytes.
pub const MAX_VM_NAME: usize = 128;
/// Longest disk id, in bytes.
pub const MAX_DISK_ID: usize = 64;

/// Why a name was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadName {
    pub what: &'static str,
    pub name: String,
    pub why: &'static str,
}

impl fmt::Display for BadName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {:?} {}", self.what, self.name, self.why)
    }
}

impl std::error::Error for BadName {}

fn bad(what: &'static str, name: &str, why: &'static str) -> BadName {
    let mut shown: String = name.chars().take(80).collect();
    if shown.len() < name.len() {
        shown.push('…');
    }
    BadName { what, name: shown, why }
}

fn vm_char_ok(c: char) -> bool {
    c.is_alphanumeric() || matches!(c, ' ' | '.' | '_' | '-' | '+' | '(' | ')' | '@' | ',' | '=')
}

/// A VM name usable as `<output>/<name>.qcow2`: 1 to 128 bytes of letters, digits, space and
/// `._-+()@,=`, not starting with `.`, `-` or a space, not ending with a space or `.`.
pub fn check_vm_name(name: &str) -> Result<(), BadName> {
    const W: &str = "VM name";
    if name.is_empty() {
        return Err(bad(W, name, "is empty"));
    }
    if name.len() > MAX_VM_NAME {
        return Err(bad(W, name, "is longer than 128 bytes"));
    }
    if let Some(c) = name.chars().next()
        && matches!(c, '.' | '-' | ' ')
    {
        return Err(bad(W, name, "must not start with '.', '-' or a space"));
    }
    if name.ends_with(' ') || name.ends_with('.') {
        return Err(bad(W, name, "must not end with a space or '.'"));
    }
    if !name.chars().all(vm_char_ok) {
        return Err(bad(
            W,
            name,
            "may contain only letters, digits, spaces and . _ - + ( ) @ , = (no '/', no control characters)",
        ));
    }
    Ok(())
}

/// Turn a display name from an OVF or VMX into a valid VM name: unusable characters become `_`,
/// leading and trailing unusable characters are dropped, and the result is cut to 128 bytes.
/// Returns `None` if nothing usable is left.
pub fn sanitize_vm_name(raw: &str) -> Option<String> {
    let mapped: String = raw.chars().map(|c| if vm_char_ok(c) { c } else { '_' }).collect();
    let trimmed = mapped.trim_matches(|c| matches!(c, '.' | '-' | ' ' | '_'));
    let mut out = String::new();
    for c in trimmed.chars() {
        if out.len() + c.len_utf8() > MAX_VM_NAME {
            break;
        }
        out.push(c);
    }
    let out = out.trim_end_matches([' ', '.']).to_string();
    check_vm_name(&out).ok().map(|()| out)
}

/// A disk id as hyper2kvm requires (`^[a-zA-Z0-9_-]+$`), at most 64 bytes, not starting with `-`.
pub fn check_disk_id(id: &str) -> Result<(), BadName> {
    const W: &str = "disk id";
    if id.is_empty() {
        return Err(bad(W, id, "is empty"));
    }
    if id.len() > MAX_DISK_ID {
        return Err(bad(W, id, "is longer than 64 bytes"));
    }
    if id.starts_with('-') {
        return Err(bad(W, id, "must not start with '-'"));
    }
    if !id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-') {
        return Err(bad(W, id, "may contain only ASCII letters, digits, '_' and '-'"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vm_names() {
        for ok in ["web01", "Ubuntu Server 22.04", "db_prod-1", "Ünïcode-VM", "a(1)", "x.y"] {
            assert!(check_vm_name(ok).is_ok(), "{ok}");
        }
        for badname in [
            "",
            "..",
            "../etc",
            "a/b",
            ".hidden",
            "-rf",
            " lead",
            "trail ",
            "trail.",
            "nul\0",
            "tab\t",
            "new\nline",
            "back\\slash",
            "semi;colon",
            "$(x)",
            "a*b",
        ] {
            assert!(check_vm_name(badname).is_err(), "{badname:?}");
        }
        assert!(check_vm_name(&"a".repeat(129)).is_err());
        assert!(check_vm_name(&"a".repeat(128)).is_ok());
    }

    #[test]
    fn sanitizing() {
        assert_eq!(sanitize_vm_name("Ubuntu/Server").as_deref(), Some("Ubuntu_Server"));
        assert_eq!(sanitize_vm_name("../../etc/passwd").as_deref(), Some("etc_passwd"));
        assert_eq!(sanitize_vm_name("-rf").as_deref(), Some("rf"));
        assert_eq!(sanitize_vm_name("///"), None);
        assert_eq!(sanitize_vm_name(&"é".repeat(100)).map(|s| s.len()), Some(128));
    }

    #[test]
    fn disk_ids() {
        for ok in ["disk0", "scsi0-0", "A_b-9"] {
            assert!(check_disk_id(ok).is_ok(), "{ok}");
        }
        for badid in ["", "-x", "a/b", "..", "a.b", "a b", "é"] {
            assert!(check_disk_id(badid).is_err(), "{badid:?}");
        }
        assert!(check_disk_id(&"a".repeat(65)).is_err());
    }
}
