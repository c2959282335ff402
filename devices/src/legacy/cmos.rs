//! The MC146818-style CMOS RTC and its battery-backed NVRAM (ports 0x70/0x71).
//!
//! The clock is the host's wall clock plus an offset the guest may change by
//! setting the time. Kernels poll the update-in-progress flag before reading
//! the time; it always reads clear, so nothing waits. The NVRAM survives a
//! guest reset, as it does on a real machine.

use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::BusDevice;

pub const BASE_PORT: u16 = 0x70;
pub const LEN: u64 = 2;
pub const IRQ: u32 = 8;

const NVRAM_SIZE: usize = 128;

const SECONDS: u8 = 0x00;
const MINUTES: u8 = 0x02;
const HOURS: u8 = 0x04;
const WEEKDAY: u8 = 0x06;
const DAY: u8 = 0x07;
const MONTH: u8 = 0x08;
const YEAR: u8 = 0x09;
const REG_A: u8 = 0x0a;
const REG_B: u8 = 0x0b;
const REG_C: u8 = 0x0c;
const REG_D: u8 = 0x0d;
const CENTURY: u8 = 0x32;

const REG_A_DEFAULT: u8 = 0x26; // 32.768 kHz time base, 1024 Hz periodic rate
const REG_B_24H: u8 = 1 << 1;
const REG_B_BINARY: u8 = 1 << 2;
const REG_D_VALID_RAM_AND_TIME: u8 = 1 << 7;
const HOUR_PM: u8 = 0x80;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CmosState {
    pub version: u32,
    pub index: u8,
    pub nvram: Vec<u8>,
    /// Guest time minus host time, in seconds.
    pub offset_secs: i64,
}

pub struct Cmos {
    index: u8,
    nvram: [u8; NVRAM_SIZE],
    offset_secs: i64,
    now: fn() -> i64,
}

fn host_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

impl Default for Cmos {
    fn default() -> Self {
        Self::new()
    }
}

impl Cmos {
    pub fn new() -> Self {
        Self::with_clock(host_now)
    }

    fn with_clock(now: fn() -> i64) -> Self {
        let mut nvram = [0u8; NVRAM_SIZE];
        nvram[REG_A as usize] = REG_A_DEFAULT;
        nvram[REG_B as usize] = REG_B_24H;
        nvram[REG_D as usize] = REG_D_VALID_RAM_AND_TIME;
        Cmos {
            index: 0,
            nvram,
            offset_secs: 0,
            now,
        }
    }

    pub fn state(&self) -> CmosState {
        CmosState {
            version: 1,
            index: self.index,
            nvram: self.nvram.to_vec(),
            offset_secs: self.offset_secs,
        }
    }

    pub fn restore(state: &CmosState) -> Self {
        let mut cmos = Self::new();
        cmos.index = state.index & 0x7f;
        let len = state.nvram.len().min(NVRAM_SIZE);
        cmos.nvram[..len].copy_from_slice(&state.nvram[..len]);
        cmos.offset_secs = state.offset_secs;
        cmos
    }

    fn guest_time(&self) -> DateTime {
        DateTime::from_unix((self.now)().saturating_add(self.offset_secs))
    }

    fn binary(&self) -> bool {
        self.nvram[REG_B as usize] & REG_B_BINARY != 0
    }

    fn encode(&self, value: u8) -> u8 {
        if self.binary() {
            value
        } else {
            ((value / 10) << 4) | (value % 10)
        }
    }

    fn decode(&self, value: u8) -> u8 {
        if self.binary() {
            value
        } else {
            (value >> 4) * 10 + (value & 0x0f)
        }
    }

    fn encode_hour(&self, hour: u8) -> u8 {
        if self.nvram[REG_B as usize] & REG_B_24H != 0 {
            return self.encode(hour);
        }
        let twelve = match hour % 12 {
            0 => 12,
            h => h,
        };
        self.encode(twelve) | if hour >= 12 { HOUR_PM } else { 0 }
    }

    fn decode_hour(&self, value: u8) -> u8 {
        if self.nvram[REG_B as usize] & REG_B_24H != 0 {
            return self.decode(value);
        }
        let hour = self.decode(value & !HOUR_PM) % 12;
        if value & HOUR_PM != 0 {
            hour + 12
        } else {
            hour
        }
    }

    fn read_register(&mut self, index: u8) -> u8 {
        let t = self.guest_time();
        match index {
            SECONDS => self.encode(t.second),
            MINUTES => self.encode(t.minute),
            HOURS => self.encode_hour(t.hour),
            WEEKDAY => self.encode(t.weekday),
            DAY => self.encode(t.day),
            MONTH => self.encode(t.month),
            YEAR => self.encode((t.year % 100) as u8),
            CENTURY => self.encode((t.year / 100) as u8),
            // Update-in-progress (bit 7) never reads set.
            REG_A => self.nvram[REG_A as usize] & 0x7f,
            // Reading C acknowledges any interrupt flags.
            REG_C => std::mem::take(&mut self.nvram[REG_C as usize]),
            REG_D => REG_D_VALID_RAM_AND_TIME,
            other => self.nvram[other as usize],
        }
    }

    fn write_register(&mut self, index: u8, value: u8) {
        let mut t = self.guest_time();
        match index {
            SECONDS => t.second = self.decode(value),
            MINUTES => t.minute = self.decode(value),
            HOURS => t.hour = self.decode_hour(value),
            WEEKDAY => return,
            DAY => t.day = self.decode(value),
            MONTH => t.month = self.decode(value),
            YEAR => t.year = t.year / 100 * 100 + i64::from(self.decode(value)),
            CENTURY => t.year = i64::from(self.decode(value)) * 100 + t.year % 100,
            REG_C | REG_D => return,
            other => {
                self.nvram[other as usize] = value;
                return;
            }
        }
        self.offset_secs = t.to_unix().saturating_sub((self.now)());
    }
}

impl BusDevice for Cmos {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let value = match offset {
            0 => self.index,
            _ => self.read_register(self.index),
        };
        data.fill(0);
        data[0] = value;
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match offset {
            // Bit 7 of the index port masks NMIs on a PC; there is nothing to mask.
            0 => self.index = data[0] & 0x7f,
            _ => self.write_register(self.index, data[0]),
        }
    }
}

/// A broken-down UTC time, as the RTC registers show it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct DateTime {
    year: i64,
    month: u8,
    day: u8,
    hour: u8,
    minute: u8,
    second: u8,
    /// 1 = Sunday.
    weekday: u8,
}

impl DateTime {
    fn from_unix(secs: i64) -> Self {
        let days = secs.div_euclid(86_400);
        let rem = secs.rem_euclid(86_400);
        let (year, month, day) = civil_from_days(days);
        DateTime {
            year,
            month,
            day,
            hour: (rem / 3600) as u8,
            minute: (rem / 60 % 60) as u8,
            second: (rem % 60) as u8,
            // 1970-01-01 was a Thursday (5 when Sunday is 1).
            weekday: ((days + 4).rem_euclid(7) + 1) as u8,
        }
    }

    /// Out-of-range fields (a guest writing day 31 of February while it sets
    /// the fields one by one) roll over instead of failing.
    fn to_unix(self) -> i64 {
        let month = i64::from(self.month.clamp(1, 12));
        let days = days_from_civil(self.year, month, 1) + i64::from(self.day) - 1;
        days * 86_400
            + i64::from(self.hour) * 3600
            + i64::from(self.minute) * 60
            + i64::from(self.second)
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date.
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let year_of_era = y - era * 400;
    let month_from_march = (month + 9) % 12;
    let day_of_year = (153 * month_from_march + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

fn civil_from_days(days: i64) -> (i64, u8, u8) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z - era * 146_097;
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let mp = (5 * day_of_year + 2) / 153;
    let day = (day_of_year - (153 * mp + 2) / 5 + 1) as u8;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u8;
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    // 2026-11-23 14:05:09 UTC, a Monday.
    const FIXED: i64 = 1_795_442_709;

    fn fixed() -> i64 {
        FIXED
    }

    fn reg(cmos: &mut Cmos, index: u8) -> u8 {
        cmos.write(0, &[index]);
        let mut b = [0u8];
        cmos.read(1, &mut b);
        b[0]
    }

    fn set(cmos: &mut Cmos, index: u8, value: u8) {
        cmos.write(0, &[index]);
        cmos.write(1, &[value]);
    }

    #[test]
    fn calendar_conversions_round_trip() {
        for days in [-800_000, -1, 0, 1, 11_016, 20_515, 2_932_896] {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, i64::from(m), i64::from(d)), days);
        }
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
    }

    #[test]
    fn shows_host_time_in_bcd() {
        let mut cmos = Cmos::with_clock(fixed);
        assert_eq!(reg(&mut cmos, SECONDS), 0x09);
        assert_eq!(reg(&mut cmos, MINUTES), 0x05);
        assert_eq!(reg(&mut cmos, HOURS), 0x14);
        assert_eq!(reg(&mut cmos, DAY), 0x23);
        assert_eq!(reg(&mut cmos, MONTH), 0x11);
        assert_eq!(reg(&mut cmos, YEAR), 0x26);
        assert_eq!(reg(&mut cmos, CENTURY), 0x20);
        assert_eq!(reg(&mut cmos, WEEKDAY), 2);
        assert_eq!(reg(&mut cmos, REG_A) & 0x80, 0, "update in progress");
        assert_eq!(reg(&mut cmos, REG_D), 0x80);
    }

    #[test]
    fn binary_and_12_hour_modes() {
        let mut cmos = Cmos::with_clock(fixed);
        set(&mut cmos, REG_B, REG_B_BINARY);
        assert_eq!(reg(&mut cmos, HOURS), 2 | HOUR_PM);
        assert_eq!(reg(&mut cmos, DAY), 23);
    }

    #[test]
    fn guest_can_set_the_time() {
        let mut cmos = Cmos::with_clock(fixed);
        set(&mut cmos, YEAR, 0x30);
        set(&mut cmos, MONTH, 0x02);
        set(&mut cmos, DAY, 0x29);
        set(&mut cmos, HOURS, 0x23);
        assert_eq!(reg(&mut cmos, YEAR), 0x30);
        assert_eq!(reg(&mut cmos, MONTH), 0x03, "2030-02-29 rolls over");
        assert_eq!(reg(&mut cmos, DAY), 0x01);
        assert_eq!(reg(&mut cmos, HOURS), 0x23);
    }

    #[test]
    fn nvram_persists_in_state() {
        let mut cmos = Cmos::with_clock(fixed);
        set(&mut cmos, 0x40, 0x5a);
        assert_eq!(reg(&mut cmos, 0x40), 0x5a);
        // The index port masks the NMI bit instead of indexing out of range.
        set(&mut cmos, 0xc0, 0x11);
        let restored = Cmos::restore(&cmos.state());
        assert_eq!(restored.state(), cmos.state());
        assert_eq!(restored.nvram[0x40], 0x11);
    }
}
