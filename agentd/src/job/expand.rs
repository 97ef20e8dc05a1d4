//! Kubernetes' `$(VAR)` references in a container's `command`, `args` and `env` values, expanded
//! as the kubelet expands them (`k8s.io/kubernetes/third_party/forked/golang/expansion`).

/// Expands `$(NAME)` in `input` with `lookup`, as Kubernetes does:
/// - `$(NAME)` becomes the variable's value when `lookup` knows it, and stays as written when it
///   does not;
/// - `$$` is an escaped `$`, so `$$(NAME)` is the literal text `$(NAME)`;
/// - any other `$`, and a `$(` that is never closed, stays as written.
pub fn expand<'a>(input: &str, lookup: impl Fn(&str) -> Option<&'a str>) -> String {
    let mut out = String::with_capacity(input.len());
    let mut rest = input;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let after = &rest[at + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some(reference) = after.strip_prefix('(')
            && let Some(close) = reference.find(')')
        {
            let name = &reference[..close];
            if let Some(value) = lookup(name) {
                out.push_str(value);
            } else {
                out.push_str("$(");
                out.push_str(name);
                out.push(')');
            }
            rest = &reference[close + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::expand;

    fn env(name: &str) -> Option<&'static str> {
        match name {
            "DATA" => Some("/data"),
            "EMPTY" => Some(""),
            _ => None,
        }
    }

    #[test]
    fn references_expand_and_unknown_ones_stay() {
        assert_eq!(expand("--dir=$(DATA)/train", env), "--dir=/data/train");
        assert_eq!(expand("$(DATA)$(DATA)", env), "/data/data");
        assert_eq!(expand("x$(EMPTY)y", env), "xy");
        assert_eq!(expand("$(MISSING)", env), "$(MISSING)");
    }

    #[test]
    fn dollar_dollar_escapes_and_stray_dollars_stay() {
        assert_eq!(expand("$$(DATA)", env), "$(DATA)");
        assert_eq!(expand("$$$(DATA)", env), "$/data");
        assert_eq!(expand("cost: 5$", env), "cost: 5$");
        assert_eq!(expand("$HOME and $1", env), "$HOME and $1");
        assert_eq!(expand("$(DATA", env), "$(DATA");
        assert_eq!(expand("$$", env), "$");
        assert_eq!(expand("a$$b", env), "a$b");
    }
}
