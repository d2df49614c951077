//! The routes table's order: which column, cycled by `s`.
use crate::views::api::RouteNow;

/// A column to sort the routes by: largest first, except the route name (alphabetical).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Sort {
    /// Where the server's time went: the default.
    #[default]
    Total,
    Rate,
    P99,
    Errors,
    P50,
    Blocks,
    Cpu,
    Downstream,
    Gc,
    Write,
    Route,
}

const ORDER: [Sort; 11] = [
    Sort::Total,
    Sort::Rate,
    Sort::P99,
    Sort::Errors,
    Sort::P50,
    Sort::Blocks,
    Sort::Cpu,
    Sort::Downstream,
    Sort::Gc,
    Sort::Write,
    Sort::Route,
];

impl Sort {
    pub fn next(self) -> Sort {
        ORDER[(self.index() + 1) % ORDER.len()]
    }

    pub fn previous(self) -> Sort {
        ORDER[(self.index() + ORDER.len() - 1) % ORDER.len()]
    }

    fn index(self) -> usize {
        ORDER.iter().position(|&s| s == self).unwrap_or(0)
    }

    /// The name shown in the routes table's title.
    pub fn name(self) -> &'static str {
        match self {
            Sort::Total => "total time",
            Sort::Rate => "rate",
            Sort::P99 => "p99",
            Sort::Errors => "errors",
            Sort::P50 => "p50",
            Sort::Blocks => "blocks",
            Sort::Cpu => "CPU",
            Sort::Downstream => "downstream",
            Sort::Gc => "GC",
            Sort::Write => "write",
            Sort::Route => "route",
        }
    }

    fn key(self, r: &RouteNow) -> f64 {
        match self {
            Sort::Total => r.total_time,
            Sort::Rate => r.rate,
            Sort::P99 => r.p99,
            Sort::Errors => r.error_ratio,
            Sort::P50 => r.p50,
            Sort::Blocks => r.mean_blocks,
            Sort::Cpu => r.cpu_share,
            Sort::Downstream => r.downstream_share,
            Sort::Gc => r.gc_share,
            Sort::Write => r.write_share,
            Sort::Route => 0.0,
        }
    }

    /// Orders `routes` by this column; ties by service and route, so rows do not jump about
    /// between refreshes.
    pub fn apply(self, routes: &mut [&RouteNow]) {
        routes.sort_by(|a, b| {
            let by_key = self.key(b).total_cmp(&self.key(a));
            let by_name = (&a.route, &a.service).cmp(&(&b.route, &b.service));
            if self == Sort::Route {
                by_name
            } else {
                by_key.then(by_name)
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn s_cycles_through_every_column_and_back() {
        let mut s = Sort::default();
        assert_eq!(s, Sort::Total);
        let mut seen = vec![s];
        for _ in 0..ORDER.len() {
            s = s.next();
            seen.push(s);
        }
        assert_eq!(seen[1..4], [Sort::Rate, Sort::P99, Sort::Errors]);
        assert_eq!(s, Sort::Total);
        assert_eq!(Sort::Total.previous(), Sort::Route);
    }
}
