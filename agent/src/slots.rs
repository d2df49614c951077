//! Stable worker slots: series are per slot, not per PID, so they survive worker recycling.
use std::collections::HashMap;

/// Stable worker slots: a new worker takes the lowest free slot; an exiting one frees it.
#[derive(Default, Debug)]
pub struct Slots {
    holders: Vec<Option<u32>>,
    by_pid: HashMap<u32, usize>,
}

impl Slots {
    /// The slot of `pid`, assigning the lowest free one if it has none. `true` if newly assigned.
    pub fn assign(&mut self, pid: u32) -> (usize, bool) {
        if let Some(&s) = self.by_pid.get(&pid) {
            return (s, false);
        }
        let s = match self.holders.iter().position(Option::is_none) {
            Some(free) => free,
            None => {
                self.holders.push(None);
                self.holders.len() - 1
            }
        };
        self.holders[s] = Some(pid);
        self.by_pid.insert(pid, s);
        (s, true)
    }

    pub fn release(&mut self, pid: u32) -> Option<usize> {
        let s = self.by_pid.remove(&pid)?;
        self.holders[s] = None;
        Some(s)
    }

    pub fn in_use(&self) -> usize {
        self.by_pid.len()
    }

    pub fn slot_of(&self, pid: u32) -> Option<usize> {
        self.by_pid.get(&pid).copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_reuse_the_lowest_free_number() {
        let mut s = Slots::default();
        assert_eq!(s.assign(100), (0, true));
        assert_eq!(s.assign(101), (1, true));
        assert_eq!(s.assign(102), (2, true));
        assert_eq!(s.assign(101), (1, false));
        assert_eq!(s.release(101), Some(1));
        assert_eq!(s.release(100), Some(0));
        assert_eq!(s.release(100), None);
        assert_eq!(s.assign(103), (0, true));
        assert_eq!(s.assign(104), (1, true));
        assert_eq!(s.assign(105), (3, true));
        assert_eq!(s.in_use(), 4);
    }
}
