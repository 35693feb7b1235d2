//! Realistic brokerage orders, as in *Spark in Action* chapter 6:
//! `time,orderId,clientId,symbol,amount,price,B|S`.

use chrono::NaiveDateTime;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

/// The time format of order lines.
pub const TIME_FORMAT: &str = "%Y-%m-%d %H:%M:%S";

#[derive(Debug, Clone)]
pub struct GeneratorConfig {
    pub clients: u32,
    pub symbols: usize,
    /// Share of lines that are malformed (0.01 = 1%).
    pub malformed: f64,
    pub seed: u64,
}

impl Default for GeneratorConfig {
    fn default() -> Self {
        Self {
            clients: 300,
            symbols: 200,
            malformed: 0.0,
            seed: 42,
        }
    }
}

/// Generates orders with skewed clients and symbols (a few are very active),
/// prices that random-walk from a per-symbol base, and amounts that are mostly small.
pub struct OrderGenerator {
    rng: SmallRng,
    config: GeneratorConfig,
    symbols: Vec<(String, f64)>,
    next_id: u64,
}

impl OrderGenerator {
    pub fn new(config: GeneratorConfig) -> Self {
        let mut rng = SmallRng::seed_from_u64(config.seed);
        // The book's symbols first, so that the symbols table of `queries/`
        // gives them sectors; made-up names after them.
        let mut names: Vec<String> = book_symbols().take(config.symbols.max(1)).collect();
        let mut taken: std::collections::BTreeSet<String> = names.iter().cloned().collect();
        while names.len() < config.symbols.max(1) {
            let len = rng.random_range(2..=4);
            let name: String = (0..len)
                .map(|_| rng.random_range(b'A'..=b'Z') as char)
                .collect();
            if taken.insert(name.clone()) {
                names.push(name);
            }
        }
        let symbols = names
            .into_iter()
            .map(|n| {
                // Log-uniform base prices between $2 and $800.
                let price = (2.0f64.ln() + rng.random::<f64>() * (400.0f64).ln()).exp();
                (n, price)
            })
            .collect();
        Self {
            rng,
            config,
            symbols,
            next_id: 1,
        }
    }

    /// The next order line at event time `time`; malformed at the configured rate.
    pub fn line(&mut self, time: NaiveDateTime) -> String {
        let line = self.order(time);
        if self.rng.random::<f64>() < self.config.malformed {
            return self.corrupt(line);
        }
        line
    }

    fn order(&mut self, time: NaiveDateTime) -> String {
        let id = self.next_id;
        self.next_id += 1;
        let client = skewed(&mut self.rng, self.config.clients as usize) + 1;
        let s = skewed(&mut self.rng, self.symbols.len());
        let step = 1.0 + (self.rng.random::<f64>() - 0.5) * 0.01;
        let (symbol, price) = &mut self.symbols[s];
        *price = (*price * step).clamp(0.5, 5000.0);
        let amount = 1 + (self.rng.random::<f64>().powi(3) * 2000.0) as u32;
        let side = if self.rng.random_bool(0.5) { 'B' } else { 'S' };
        format!(
            "{},{id},{client},{symbol},{amount},{:.2},{side}",
            time.format(TIME_FORMAT),
            price
        )
    }

    /// The kinds of damage real feeds show: cut lines, noise, bad numbers and dates.
    fn corrupt(&mut self, line: String) -> String {
        let fields: Vec<&str> = line.split(',').collect();
        match self.rng.random_range(0..5) {
            0 => fields[..4].join(","),
            1 => "#### feed reconnect ####".to_string(),
            2 => format!(
                "{},{},{},{},12O,{},{}",
                fields[0], fields[1], fields[2], fields[3], fields[5], fields[6]
            ),
            3 => format!("2016-13-45 99:00:00,{}", fields[1..].join(",")),
            _ => format!("{line},EXTRA"),
        }
    }
}

/// An index in `0..n` where low indices are much more likely (a few heavy traders).
/// The symbols table shipped in `queries/` (symbol, sector, name): the book's symbols.
pub const SYMBOLS_CSV: &str = include_str!("../queries/symbols.csv");

/// The book's symbols, as `queries/symbols.csv` lists them.
pub fn book_symbols() -> impl Iterator<Item = String> {
    SYMBOLS_CSV
        .lines()
        .skip(1)
        .filter_map(|l| l.split(',').next())
        .filter(|s| !s.is_empty())
        .map(str::to_string)
}

fn skewed(rng: &mut SmallRng, n: usize) -> usize {
    let u: f64 = rng.random();
    ((u * u * n as f64) as usize).min(n.saturating_sub(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_have_the_book_shape() {
        let mut g = OrderGenerator::new(GeneratorConfig::default());
        let t = NaiveDateTime::parse_from_str("2016-03-22 20:25:28", TIME_FORMAT).unwrap();
        let line = g.line(t);
        let f: Vec<&str> = line.split(',').collect();
        assert_eq!(f.len(), 7, "{line}");
        assert_eq!(f[0], "2016-03-22 20:25:28");
        assert_eq!(f[1], "1");
        assert!(f[4].parse::<u32>().is_ok() && f[5].parse::<f64>().is_ok());
        assert!(f[6] == "B" || f[6] == "S");
    }

    #[test]
    fn symbols_are_the_books_then_made_up() {
        let g = OrderGenerator::new(GeneratorConfig {
            symbols: 100,
            ..Default::default()
        });
        let names: Vec<&str> = g.symbols.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names.len(), 100);
        assert_eq!(names[..80], book_symbols().collect::<Vec<_>>()[..]);
        assert_eq!(
            names
                .iter()
                .collect::<std::collections::BTreeSet<_>>()
                .len(),
            100
        );
        let few = OrderGenerator::new(GeneratorConfig {
            symbols: 3,
            ..Default::default()
        });
        assert_eq!(few.symbols.len(), 3);
    }

    #[test]
    fn malformed_rate_is_respected() {
        let config = GeneratorConfig {
            malformed: 0.1,
            ..Default::default()
        };
        let mut g = OrderGenerator::new(config);
        let t = NaiveDateTime::parse_from_str("2016-03-22 20:25:28", TIME_FORMAT).unwrap();
        let bad = (0..10_000)
            .map(|_| g.line(t))
            .filter(|l| l.split(',').count() != 7 || l.contains("12O") || l.starts_with("2016-13"))
            .count();
        assert!((800..1200).contains(&bad), "{bad}");
    }
}
