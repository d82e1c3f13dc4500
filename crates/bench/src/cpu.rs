//! CPU time of another process, read from `/proc/<pid>/stat` (Linux).

use anyhow::{Context, Result, bail};

/// Clock ticks per second used by `/proc/<pid>/stat`: `getconf CLK_TCK`, or 100 if unavailable.
pub fn clock_ticks_per_sec() -> u64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse::<u64>().ok())
        .filter(|&t| t > 0)
        .unwrap_or(100)
}

/// Parses utime + stime (in clock ticks) out of the contents of a `/proc/<pid>/stat` file.
pub fn parse_stat_ticks(stat: &str) -> Result<u64> {
    // The command name (field 2) is in parentheses and may itself contain spaces or ')'.
    let close = stat
        .rfind(')')
        .context("malformed /proc stat: no ')' after the command name")?;
    // Fields after ')' start at field 3 (state); utime is field 14 and stime field 15.
    let mut fields = stat[close + 1..].split_ascii_whitespace().skip(11);
    let mut next = |name: &str| -> Result<u64> {
        let raw = fields
            .next()
            .with_context(|| format!("malformed /proc stat: missing {name}"))?;
        raw.parse::<u64>()
            .with_context(|| format!("malformed /proc stat: {name} = {raw:?}"))
    };
    let utime = next("utime")?;
    let stime = next("stime")?;
    Ok(utime + stime)
}

/// Reads utime + stime of `pid` in clock ticks.
pub fn process_cpu_ticks(pid: u32) -> Result<u64> {
    let path = format!("/proc/{pid}/stat");
    let stat = match std::fs::read_to_string(&path) {
        Ok(s) => s,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            bail!("process {pid} not found ({path} does not exist)")
        }
        Err(e) => return Err(e).with_context(|| format!("reading {path}")),
    };
    parse_stat_ticks(&stat).with_context(|| format!("parsing {path}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_utime_stime() {
        let stat = "1234 (node) S 1 1234 1234 0 -1 4194560 2000 0 0 0 150 25 0 0 20 0 11 0 100 \
                    1000000 5000 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 1 0 0 0 0 0";
        assert_eq!(parse_stat_ticks(stat).ok(), Some(175));
    }

    #[test]
    fn command_with_spaces_and_parens() {
        let stat = "42 (my (weird) cmd) R 1 42 42 0 -1 0 0 0 0 0 7 3 0 0 20 0 1 0 5 0 0";
        assert_eq!(parse_stat_ticks(stat).ok(), Some(10));
    }

    #[test]
    fn malformed() {
        assert!(parse_stat_ticks("garbage").is_err());
        assert!(parse_stat_ticks("1 (x) S 1 2").is_err());
        assert!(parse_stat_ticks("1 (x) S 1 1 1 0 -1 0 0 0 0 0 abc 3").is_err());
    }

    #[test]
    fn reads_own_process() {
        assert!(process_cpu_ticks(std::process::id()).is_ok());
        assert!(clock_ticks_per_sec() > 0);
    }
}
