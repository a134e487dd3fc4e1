//! Canonical request paths. Routing, filters and the upstream all see one canonical form, so a
//! path cannot look like `/public/..%2Fadmin` to the router and `/admin` to the upstream.
//!
//! Rules: percent-encoded unreserved characters are decoded (`%41` → `A`, `%2E` → `.`),
//! other escapes are kept with upper-case hex (`%2f` → `%2F`: an encoded slash stays data),
//! dot segments are removed (RFC 3986 §5.2.4), and NUL, malformed escapes and relative paths
//! are rejected.

use std::borrow::Cow;

/// Why a path was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PathError {
    /// `%` not followed by two hex digits.
    #[error("malformed percent-encoding")]
    BadEscape,
    /// An encoded or raw NUL byte.
    #[error("NUL in path")]
    Nul,
    /// The path does not start with `/`.
    #[error("path must start with '/'")]
    NotAbsolute,
}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Whether a path has anything to canonicalise: a `%` escape, a NUL, or a `.` or `..`
/// segment. One pass (four substring searches cost ~700 instructions on `/api/items`).
fn needs_work(bytes: &[u8]) -> bool {
    for (i, &b) in bytes.iter().enumerate() {
        match b {
            b'%' | 0 => return true,
            b'/' => {
                let rest = &bytes[i + 1..];
                let dots = rest.iter().take(3).take_while(|&&c| c == b'.').count();
                if (dots == 1 || dots == 2) && rest.get(dots).is_none_or(|&c| c == b'/') {
                    return true;
                }
            }
            _ => {}
        }
    }
    false
}

/// Canonicalises a path (without the query). Borrows when the path is already canonical,
/// which is the common case and costs one scan.
pub fn normalize(path: &str) -> Result<Cow<'_, str>, PathError> {
    if !path.starts_with('/') {
        return Err(PathError::NotAbsolute);
    }
    let bytes = path.as_bytes();
    if !needs_work(bytes) {
        return Ok(Cow::Borrowed(path));
    }
    // 1. Percent-decoding of unreserved characters; normalise the rest to upper-case hex.
    let mut decoded = String::with_capacity(path.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            0 => return Err(PathError::Nul),
            b'%' => {
                let (h, l) = match (
                    bytes.get(i + 1).copied().and_then(hex),
                    bytes.get(i + 2).copied().and_then(hex),
                ) {
                    (Some(h), Some(l)) => (h, l),
                    _ => return Err(PathError::BadEscape),
                };
                let v = h * 16 + l;
                if v == 0 {
                    return Err(PathError::Nul);
                }
                if is_unreserved(v) {
                    decoded.push(v as char);
                } else {
                    decoded.push('%');
                    decoded.push(char::from(b"0123456789ABCDEF"[h as usize]));
                    decoded.push(char::from(b"0123456789ABCDEF"[l as usize]));
                }
                i += 3;
            }
            _ => {
                // Push the whole UTF-8 run up to the next special byte.
                let start = i;
                while i < bytes.len() && bytes[i] != b'%' && bytes[i] != 0 {
                    i += 1;
                }
                decoded.push_str(&path[start..i]);
            }
        }
    }
    // 2. Dot-segment removal over segments.
    let mut out: Vec<&str> = Vec::new();
    let segments: Vec<&str> = decoded[1..].split('/').collect();
    let last = segments.len() - 1;
    let mut trailing_slash = false;
    for (idx, seg) in segments.iter().enumerate() {
        match *seg {
            "." => trailing_slash = idx == last,
            ".." => {
                out.pop();
                trailing_slash = idx == last;
            }
            s => {
                out.push(s);
                trailing_slash = false;
            }
        }
    }
    let mut result = String::with_capacity(decoded.len());
    for s in &out {
        result.push('/');
        result.push_str(s);
    }
    if trailing_slash || result.is_empty() {
        result.push('/');
    }
    Ok(Cow::Owned(result))
}

#[cfg(test)]
mod tests {
    use super::{needs_work, normalize};

    #[test]
    fn the_one_pass_check_agrees_with_the_substring_rules() {
        // Every path of up to 7 characters over `/ . a %` (and a NUL) starting with `/`.
        let alphabet = [b'/', b'.', b'a', b'%', 0];
        let mut paths: Vec<Vec<u8>> = vec![b"/".to_vec()];
        let mut frontier = paths.clone();
        for _ in 0..6 {
            let mut next = Vec::new();
            for p in &frontier {
                for &c in &alphabet {
                    let mut q = p.clone();
                    q.push(c);
                    next.push(q);
                }
            }
            paths.extend(next.iter().cloned());
            frontier = next;
        }
        for p in paths {
            let s = std::str::from_utf8(&p).unwrap();
            let rules = p.iter().any(|&b| b == b'%' || b == 0)
                || s.contains("/./")
                || s.contains("/../")
                || s.ends_with("/.")
                || s.ends_with("/..");
            assert_eq!(needs_work(&p), rules, "{s:?}");
        }
    }

    #[test]
    fn canonical_paths_are_borrowed() {
        assert!(matches!(
            normalize("/a/b/c").unwrap(),
            std::borrow::Cow::Borrowed(_)
        ));
    }

    #[test]
    fn dot_segments_and_escapes() {
        let cases = [
            ("/a/./b", "/a/b"),
            ("/a/../b", "/b"),
            ("/../../etc/passwd", "/etc/passwd"),
            ("/a/%2e%2e/b", "/b"),
            ("/a/%2E%2E/%2e/b", "/b"),
            ("/public/..%2Fadmin", "/public/..%2Fadmin"),
            ("/%41%62c", "/Abc"),
            ("/a%2fb", "/a%2Fb"),
            ("/a/b/..", "/a/"),
            ("/a/b/.", "/a/b/"),
            ("/..", "/"),
            ("/a//b", "/a//b"),
        ];
        for (input, want) in cases {
            assert_eq!(normalize(input).unwrap(), want, "{input}");
        }
    }

    #[test]
    fn rejects() {
        assert!(normalize("/a%00b").is_err());
        assert!(normalize("/a%zz").is_err());
        assert!(normalize("/a%2").is_err());
        assert!(normalize("a/b").is_err());
    }
}
