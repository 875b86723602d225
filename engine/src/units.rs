//! The units operators type, parsed the same way by every pagewire tool: sizes (`2GiB`), rates
//! (`10Gbit`, `125MiB`) and durations (`30s`, `500ms`). Errors are sentences for the command
//! line.

/// Parses a size: `4096`, `64K`, `512MiB`, `1G`, `2GiB`, `1TiB` (binary units, as QEMU reads
/// them); a positive whole number of pages.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, unit) = t.split_at(split);
    if digits.is_empty() {
        return Err(format!("{text:?} is not a size: expected a number with an optional unit (K, M, G, T, KiB, MiB, GiB, TiB), e.g. 1GiB"));
    }
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("{text:?}: number too large"))?;
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kib" | "kb" => 10,
        "m" | "mib" | "mb" => 20,
        "g" | "gib" | "gb" => 30,
        "t" | "tib" | "tb" => 40,
        other => {
            return Err(format!(
                "{text:?}: unknown unit {other:?} (use K, M, G, T, KiB, MiB, GiB or TiB)"
            ))
        }
    };
    let bytes = n
        .checked_mul(1u64 << shift)
        .ok_or_else(|| format!("{text:?}: size too large"))?;
    if bytes == 0 || bytes % crate::limits::PAGE_BYTES as u64 != 0 {
        return Err(format!(
            "{text:?} is {bytes} bytes; sizes must be a positive multiple of {} bytes (one page)",
            crate::limits::PAGE_BYTES
        ));
    }
    Ok(bytes)
}

/// Parses a rate in bytes per second: `125000000`, `125M`, `119MiB`, `1Gbit`, `100Mbit`,
/// `10gbit`, `1Tbit` (bit units are decimal, byte units binary).
pub fn parse_rate(text: &str) -> Result<u64, String> {
    let t = text.trim().trim_end_matches("/s");
    // "MBps" is megabytes to some and a typo of "Mbps" to others: refused, not guessed.
    if t.ends_with("Bps") {
        return Err(format!(
            "{text:?}: write bytes per second as 125M or 119MiB, bits as 1Gbit or 1000Mbps"
        ));
    }
    let lower = t.to_ascii_lowercase();
    if let Some(bits) = lower
        .strip_suffix("bit")
        .or_else(|| lower.strip_suffix("bps"))
    {
        let split = bits
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(bits.len());
        let (n, unit) = bits.split_at(split);
        let n: u64 = n
            .parse()
            .map_err(|_| format!("{text:?} is not a rate such as 100Mbit or 125MiB"))?;
        let mult: u64 = match unit {
            "" => 1,
            "k" => 1_000,
            "m" => 1_000_000,
            "g" => 1_000_000_000,
            "t" => 1_000_000_000_000,
            other => {
                return Err(format!(
                    "{text:?}: unknown unit {other:?}bit (use kbit, Mbit, Gbit or Tbit)"
                ))
            }
        };
        let bytes = n.checked_mul(mult).ok_or("rate too large")? / 8;
        return if bytes == 0 {
            Err(format!("{text:?} is less than a byte per second"))
        } else {
            Ok(bytes)
        };
    }
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (n, unit) = t.split_at(split);
    let n: u64 = n
        .parse()
        .map_err(|_| format!("{text:?} is not a rate such as 100Mbit or 125MiB"))?;
    if unit.len() == 2 && unit.ends_with('b') {
        // `Mb` reads as megabits to a network person and as megabytes to others.
        return Err(format!(
            "{text:?} is ambiguous: say {n}{p}bit for bits or {n}{P}iB for bytes",
            p = &unit[..1],
            P = unit[..1].to_ascii_uppercase()
        ));
    }
    let shift = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kib" | "kb" => 10,
        "m" | "mib" | "mb" => 20,
        "g" | "gib" | "gb" => 30,
        "t" | "tib" | "tb" => 40,
        other => return Err(format!("{text:?}: unknown unit {other:?}")),
    };
    let bytes = n.checked_mul(1 << shift).ok_or("rate too large")?;
    if bytes == 0 {
        return Err("the rate must be positive".into());
    }
    Ok(bytes)
}

/// Parses a duration into milliseconds: `500ms`, `30s`, `2m`, `1h`; a plain number is seconds.
pub fn parse_duration_ms(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, unit) = t.split_at(split);
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("{text:?} is not a duration such as 30s, 500ms or 2m"))?;
    let ms = match unit.trim() {
        "ms" => Some(n),
        "" | "s" => n.checked_mul(1000),
        "m" | "min" => n.checked_mul(60_000),
        "h" => n.checked_mul(3_600_000),
        other => {
            return Err(format!(
                "{text:?}: unknown unit {other:?} (use ms, s, m or h)"
            ))
        }
    }
    .ok_or_else(|| format!("{text:?} is too long"))?;
    Ok(ms)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_parse_in_bits_or_bytes() {
        assert_eq!(parse_rate("100Mbit"), Ok(12_500_000));
        assert_eq!(parse_rate("1Gbit"), Ok(125_000_000));
        assert_eq!(parse_rate("10gbit/s"), Ok(1_250_000_000));
        assert_eq!(parse_rate("1Tbit"), Ok(125_000_000_000));
        assert_eq!(parse_rate("125MiB"), Ok(125 << 20));
        assert_eq!(parse_rate("2TiB"), Ok(2 << 40));
        assert_eq!(parse_rate("4096"), Ok(4096));
        assert_eq!(parse_rate("1000Mbps"), Ok(125_000_000));
        for bad in [
            "", "fast", "0", "3parsec", "1xbit", "100MBps", "1GBps/s", "100Mb", "1gb", "10kb",
        ] {
            assert!(parse_rate(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn sizes_parse_with_binary_units_and_reject_nonsense() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("64M"), Ok(64 << 20));
        assert_eq!(parse_size("2g"), Ok(2 << 30));
        for bad in ["", "GiB", "12 parsecs", "100", "0", "99999999999999999999T"] {
            assert!(parse_size(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn durations_parse_to_milliseconds() {
        assert_eq!(parse_duration_ms("500ms"), Ok(500));
        assert_eq!(parse_duration_ms("30s"), Ok(30_000));
        assert_eq!(parse_duration_ms("30"), Ok(30_000));
        assert_eq!(parse_duration_ms("2m"), Ok(120_000));
        for bad in ["", "s", "1 fortnight", "99999999999999999999h"] {
            assert!(parse_duration_ms(bad).is_err(), "{bad:?}");
        }
    }
}
