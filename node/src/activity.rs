//! When a volunteer's node works: active hours (`schedule = "22:00-07:00"`
//! in node.toml, `--schedule`) and pause and resume on a running daemon
//! (`barnraise node pause` / `resume`, or SIGUSR1 / SIGUSR2), as BOINC users
//! expect them (docs/running-a-node.md, "When the node works").
//!
//! Outside its hours, or paused, the node stands by: it tells the
//! coordinator it is leaving (so it is neither counted missing nor planned),
//! trains nothing, and joins again when it may work. It also stands by when
//! its hours end before a round could finish, so it never takes work it
//! cannot deliver.

use serde::{Deserialize, Serialize};
use std::time::Duration;

const MINUTES_PER_DAY: u32 = 24 * 60;

/// Daily active hours, `HH:MM-HH:MM` in local time; a window whose end is
/// before its start runs past midnight (`22:00-07:00`). Equal ends mean
/// all day.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Schedule {
    /// Minutes after local midnight.
    start: u32,
    end: u32,
}

impl std::str::FromStr for Schedule {
    type Err = String;

    fn from_str(text: &str) -> Result<Schedule, String> {
        let bad = || {
            format!(
                "`{text}` is not active hours like 22:00-07:00 (HH:MM-HH:MM, local time, 24-hour)"
            )
        };
        let (start, end) = text.trim().split_once('-').ok_or_else(bad)?;
        let minutes = |part: &str| -> Result<u32, String> {
            let (h, m) = part.trim().split_once(':').ok_or_else(bad)?;
            let (h, m): (u32, u32) = (h.parse().map_err(|_| bad())?, m.parse().map_err(|_| bad())?);
            if h > 23 || m > 59 || part.trim().len() != 5 {
                return Err(bad());
            }
            Ok(h * 60 + m)
        };
        Ok(Schedule {
            start: minutes(start)?,
            end: minutes(end)?,
        })
    }
}

impl std::fmt::Display for Schedule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:02}:{:02}-{:02}:{:02}",
            self.start / 60,
            self.start % 60,
            self.end / 60,
            self.end % 60
        )
    }
}

impl Serialize for Schedule {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for Schedule {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        String::deserialize(deserializer)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

impl Schedule {
    /// How long the window stays open from `second_of_day` (seconds after
    /// local midnight); `None` when it is closed then.
    pub fn open_for(&self, second_of_day: u32) -> Option<Duration> {
        let now = second_of_day % (MINUTES_PER_DAY * 60);
        let (start, end) = (self.start * 60, self.end * 60);
        if start == end {
            return Some(Duration::from_secs(u64::from(MINUTES_PER_DAY) * 60));
        }
        let day = MINUTES_PER_DAY * 60;
        let inside = if start < end {
            now >= start && now < end
        } else {
            now >= start || now < end
        };
        inside.then(|| Duration::from_secs(u64::from((end + day - now) % day)))
    }

    /// How long until the window opens from `second_of_day` (zero while it is open).
    pub fn opens_in(&self, second_of_day: u32) -> Duration {
        if self.open_for(second_of_day).is_some() {
            return Duration::ZERO;
        }
        let day = MINUTES_PER_DAY * 60;
        let now = second_of_day % day;
        Duration::from_secs(u64::from((self.start * 60 + day - now) % day))
    }
}

/// Seconds after local midnight, now (the C library's idea of local time,
/// which follows `TZ` and /etc/localtime).
pub fn local_second_of_day() -> u32 {
    local_second_of_day_at(std::time::SystemTime::now())
}

#[cfg(unix)]
#[allow(unsafe_code)]
fn local_second_of_day_at(at: std::time::SystemTime) -> u32 {
    let secs = at
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let t = libc::time_t::try_from(secs).unwrap_or(0);
    // SAFETY: localtime_r only writes the `tm` we own and reads `t`; it is
    // the thread-safe variant.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    let converted = unsafe { !libc::localtime_r(&t, &mut tm).is_null() };
    if !converted {
        return (secs % 86_400) as u32;
    }
    let seconds = i64::from(tm.tm_hour) * 3600 + i64::from(tm.tm_min) * 60 + i64::from(tm.tm_sec);
    seconds.clamp(0, 86_399) as u32
}

/// Without a C library to ask, UTC.
#[cfg(not(unix))]
fn local_second_of_day_at(at: std::time::SystemTime) -> u32 {
    let secs = at
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    (secs % 86_400) as u32
}

/// A running node's pause switch: `true` means paused. The CLI flips it on
/// SIGUSR1 (pause) and SIGUSR2 (resume); tests and embedders flip it with
/// the sender [`pause_switch`] hands out.
#[derive(Clone, Debug)]
pub struct PauseSwitch {
    paused: tokio::sync::watch::Receiver<bool>,
}

impl PartialEq for PauseSwitch {
    fn eq(&self, other: &Self) -> bool {
        self.paused.same_channel(&other.paused)
    }
}

/// A new pause switch, not paused: the sender to flip it, and the switch
/// to put in `NodeConfig::pause`.
pub fn pause_switch() -> (tokio::sync::watch::Sender<bool>, PauseSwitch) {
    let (tx, rx) = tokio::sync::watch::channel(false);
    (tx, PauseSwitch { paused: rx })
}

impl PauseSwitch {
    pub fn is_paused(&self) -> bool {
        *self.paused.borrow()
    }

    /// Waits until the switch changes (or its sender is gone: then never).
    pub async fn changed(&mut self) {
        if self.paused.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const H: u32 = 3600;

    #[test]
    fn schedules_parse_and_print_and_refuse_nonsense() {
        let night: Schedule = "22:00-07:00".parse().unwrap();
        assert_eq!(night.to_string(), "22:00-07:00");
        assert_eq!(
            " 09:30-17:45 ".parse::<Schedule>().unwrap().to_string(),
            "09:30-17:45"
        );
        for bad in [
            "",
            "22-07",
            "24:00-07:00",
            "22:60-07:00",
            "7:00-9:00",
            "22:00",
            "a:b-c:d",
        ] {
            let err = bad.parse::<Schedule>().unwrap_err();
            assert!(err.contains("HH:MM-HH:MM"), "{bad}: {err}");
        }
        let from_toml: std::collections::BTreeMap<String, Schedule> =
            toml::from_str("schedule = \"22:00-07:00\"").unwrap();
        assert_eq!(from_toml["schedule"], night);
    }

    #[test]
    fn a_window_past_midnight_is_open_at_night_and_says_how_long() {
        let night: Schedule = "22:00-07:00".parse().unwrap();
        assert_eq!(
            night.open_for(23 * H),
            Some(Duration::from_secs(u64::from(8 * H)))
        );
        assert_eq!(
            night.open_for(6 * H + 59 * 60),
            Some(Duration::from_secs(60))
        );
        assert_eq!(night.open_for(7 * H), None);
        assert_eq!(night.open_for(12 * H), None);
        assert_eq!(
            night.opens_in(12 * H),
            Duration::from_secs(u64::from(10 * H))
        );
        assert_eq!(night.opens_in(23 * H), Duration::ZERO);
        let day: Schedule = "09:00-17:00".parse().unwrap();
        assert_eq!(day.open_for(8 * H), None);
        assert_eq!(day.opens_in(8 * H), Duration::from_secs(u64::from(H)));
        assert_eq!(
            day.open_for(16 * H),
            Some(Duration::from_secs(u64::from(H)))
        );
        assert_eq!(day.opens_in(18 * H), Duration::from_secs(u64::from(15 * H)));
        let always: Schedule = "00:00-00:00".parse().unwrap();
        assert!(always.open_for(5 * H).is_some());
    }

    #[test]
    fn local_time_counts_seconds_and_minutes() {
        // 2026-06-15 12:00:00 UTC, far from any daylight-saving change: 90
        // seconds later is 90 seconds later in any time zone.
        let noon = std::time::UNIX_EPOCH + Duration::from_secs(1_781_524_800);
        let before = local_second_of_day_at(noon);
        let after = local_second_of_day_at(noon + Duration::from_secs(90));
        assert_eq!((after + 86_400 - before) % 86_400, 90);
        assert!(local_second_of_day() < 86_400);
    }

    #[test]
    fn a_pause_switch_flips_and_compares_by_channel() {
        let (tx, switch) = pause_switch();
        assert!(!switch.is_paused());
        tx.send(true).unwrap();
        assert!(switch.is_paused());
        let (_, other) = pause_switch();
        assert_eq!(switch.clone(), switch);
        assert_ne!(switch, other);
    }
}
