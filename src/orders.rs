//! Realistic brokerage orders, as in *Spark in Action* chapter 6:
//! `time,orderId,clientId,symbol,amount,price,B|S`; and the fills of some of
//! them, in the same shape: `time,fillId,orderId,quantity,price`.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use chrono::{NaiveDateTime, TimeDelta};
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
        self.next_order(time).0
    }

    /// The next order line at event time `time`, and the order it holds unless
    /// the line was damaged (a reader dropping malformed lines never sees that order).
    pub fn next_order(&mut self, time: NaiveDateTime) -> (String, Option<Order>) {
        let (line, order) = self.order(time);
        if self.rng.random::<f64>() < self.config.malformed {
            return (self.corrupt(line), None);
        }
        (line, Some(order))
    }

    fn order(&mut self, time: NaiveDateTime) -> (String, Order) {
        let id = self.next_id;
        self.next_id += 1;
        let client = skewed(&mut self.rng, self.config.clients as usize) + 1;
        let s = skewed(&mut self.rng, self.symbols.len());
        let step = 1.0 + (self.rng.random::<f64>() - 0.5) * 0.01;
        let (symbol, price) = &mut self.symbols[s];
        *price = (*price * step).clamp(0.5, 5000.0);
        let amount = 1 + (self.rng.random::<f64>().powi(3) * 2000.0) as u32;
        let side = if self.rng.random_bool(0.5) { 'B' } else { 'S' };
        let line = format!(
            "{},{id},{client},{symbol},{amount},{:.2},{side}",
            time.format(TIME_FORMAT),
            price
        );
        let order = Order {
            id,
            time,
            amount,
            price: *price,
        };
        (line, order)
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

/// What a fill needs of its order.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Order {
    pub id: u64,
    pub time: NaiveDateTime,
    pub amount: u32,
    pub price: f64,
}

/// How long after its order a fill is on time; `FillConfig::late` fills come later.
pub const FILL_BOUND: TimeDelta = TimeDelta::seconds(60);

#[derive(Debug, Clone)]
pub struct FillConfig {
    /// Share of orders that get a fill (0.8 = 80%); the others never do.
    pub filled: f64,
    /// Share of fills that come more than [`FILL_BOUND`] after their order.
    pub late: f64,
    pub seed: u64,
}

impl Default for FillConfig {
    fn default() -> Self {
        Self {
            filled: 0.8,
            late: 0.05,
            seed: 42,
        }
    }
}

/// Fills of orders, given as they are generated: each order gets at most one,
/// a random delay after it (most within a few seconds, a `late` share 61 s to
/// 5 min after it); fills come out in event-time order, numbered as they do.
/// Its random numbers are its own, so that orders are the same with or without fills.
pub struct FillGenerator {
    rng: SmallRng,
    config: FillConfig,
    /// Fills not yet due: (time, order of scheduling, order id, "quantity,price").
    pending: BinaryHeap<Reverse<(NaiveDateTime, u64, u64, String)>>,
    scheduled: u64,
    next_id: u64,
}

impl FillGenerator {
    pub fn new(config: FillConfig) -> Self {
        Self {
            // Not the orders' seed as is: the same stream would tie each order's
            // fill to its own random draws.
            rng: SmallRng::seed_from_u64(config.seed ^ 0xf111_5eed_f111_5eed),
            config,
            pending: BinaryHeap::new(),
            scheduled: 0,
            next_id: 1,
        }
    }

    /// Decides whether `order` gets a fill, and when.
    pub fn add(&mut self, order: &Order) {
        if self.rng.random::<f64>() >= self.config.filled {
            return;
        }
        let delay_ms = if self.rng.random::<f64>() < self.config.late {
            self.rng.random_range(61_000..=300_000)
        } else {
            // Exponential with a mean of 2 s, kept under the bound: a fill at
            // most 59.999 s after its order is on time even once both times
            // are cut to the second.
            let u: f64 = self.rng.random();
            ((-(1.0 - u).ln() * 2000.0) as i64).min(59_999)
        };
        // One fill in five is partial.
        let quantity = if self.rng.random_bool(0.2) {
            self.rng.random_range(1..=order.amount.max(1))
        } else {
            order.amount
        };
        let slip = 1.0 + (self.rng.random::<f64>() - 0.5) * 0.002;
        let price = (order.price * slip).max(0.01);
        // An order at the end of the calendar (`--start` far ahead) gets no fill after it.
        let Some(at) = order
            .time
            .checked_add_signed(TimeDelta::milliseconds(delay_ms))
        else {
            return;
        };
        self.scheduled += 1;
        self.pending.push(Reverse((
            at,
            self.scheduled,
            order.id,
            format!("{quantity},{price:.2}"),
        )));
    }

    /// The lines of the fills due at or before `time`, oldest first.
    pub fn due(&mut self, time: NaiveDateTime) -> Vec<String> {
        let mut lines = vec![];
        while self
            .pending
            .peek()
            .is_some_and(|Reverse((at, ..))| *at <= time)
        {
            let Some(Reverse((at, _, order_id, rest))) = self.pending.pop() else {
                break;
            };
            lines.push(format!(
                "{},{},{order_id},{rest}",
                at.format(TIME_FORMAT),
                self.next_id
            ));
            self.next_id += 1;
        }
        lines
    }

    /// The lines of every fill not given yet, oldest first.
    pub fn rest(&mut self) -> Vec<String> {
        self.due(NaiveDateTime::MAX)
    }
}

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

/// An index in `0..n` where low indices are much more likely (a few heavy traders).
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

    /// Orders 10 ms apart through a fill generator: the orders (id -> time)
    /// and the fill lines, taken as they fall due.
    fn orders_and_fills(
        count: usize,
        config: FillConfig,
    ) -> (std::collections::HashMap<u64, NaiveDateTime>, Vec<String>) {
        let mut orders = OrderGenerator::new(GeneratorConfig::default());
        let mut fills = FillGenerator::new(config);
        let start = NaiveDateTime::parse_from_str("2016-03-22 20:25:28", TIME_FORMAT).unwrap();
        let (mut times, mut lines) = (std::collections::HashMap::new(), vec![]);
        for i in 0..count {
            let (_, order) = orders.next_order(start + TimeDelta::milliseconds(10 * i as i64));
            let order = order.unwrap();
            let second = NaiveDateTime::parse_from_str(
                &order.time.format(TIME_FORMAT).to_string(),
                TIME_FORMAT,
            )
            .unwrap();
            times.insert(order.id, second);
            fills.add(&order);
            lines.extend(fills.due(order.time));
        }
        lines.extend(fills.rest());
        (times, lines)
    }

    #[test]
    fn fills_follow_their_orders_in_the_configured_shares() {
        let (orders, fills) = orders_and_fills(20_000, FillConfig::default());
        let (mut late, mut within_5s, mut previous) = (0, 0, None);
        let mut filled = std::collections::HashSet::new();
        for (n, line) in fills.iter().enumerate() {
            let f: Vec<&str> = line.split(',').collect();
            assert_eq!(f.len(), 5, "{line}");
            let time = NaiveDateTime::parse_from_str(f[0], TIME_FORMAT).unwrap();
            assert_eq!(f[1], (n + 1).to_string(), "fill ids count up: {line}");
            let order_id: u64 = f[2].parse().unwrap();
            assert!(filled.insert(order_id), "a second fill of {order_id}");
            assert!(f[3].parse::<u32>().unwrap() >= 1 && f[4].parse::<f64>().unwrap() > 0.0);
            let delay = time - orders[&order_id];
            assert!(delay >= TimeDelta::zero(), "{line} before its order");
            assert!(
                delay <= TimeDelta::seconds(301),
                "{line}: late by at most 5 min"
            );
            late += usize::from(delay > FILL_BOUND);
            within_5s += usize::from(delay <= TimeDelta::seconds(5));
            assert!(previous <= Some(time), "fills come out in time order");
            previous = Some(time);
        }
        // 80% of 20,000 orders filled; 5% of those fills late; the rest mostly within seconds.
        assert!((15_500..16_500).contains(&fills.len()), "{}", fills.len());
        assert!((650..950).contains(&late), "{late} late fills");
        assert!(within_5s * 100 > fills.len() * 75, "{within_5s} within 5 s");
    }

    #[test]
    fn fills_depend_on_the_seed_only() {
        let config = |seed| FillConfig {
            seed,
            ..Default::default()
        };
        let (_, a) = orders_and_fills(2000, config(7));
        let (_, b) = orders_and_fills(2000, config(7));
        let (_, c) = orders_and_fills(2000, config(8));
        assert_eq!(a, b);
        assert_ne!(a, c);
        let none = FillConfig {
            filled: 0.0,
            ..Default::default()
        };
        assert!(orders_and_fills(2000, none).1.is_empty());
    }

    #[test]
    fn damaged_orders_get_no_fill_and_orders_are_the_same_with_fills() {
        let config = GeneratorConfig {
            malformed: 0.2,
            ..Default::default()
        };
        let t = NaiveDateTime::parse_from_str("2016-03-22 20:25:28", TIME_FORMAT).unwrap();
        let mut plain = OrderGenerator::new(config.clone());
        let mut with_orders = OrderGenerator::new(config);
        for _ in 0..1000 {
            let (line, order) = with_orders.next_order(t);
            assert_eq!(plain.line(t), line);
            match order {
                Some(o) => assert!(line.starts_with(&format!("2016-03-22 20:25:28,{},", o.id))),
                None => assert!(
                    line.split(',').count() != 7
                        || line.contains("12O")
                        || line.starts_with("2016-13"),
                    "{line}"
                ),
            }
        }
    }

    /// A fill's time past the calendar's end overflowed (a panic) before it was checked.
    #[test]
    fn orders_at_the_end_of_the_calendar_get_no_fill_past_it() {
        let mut fills = FillGenerator::new(FillConfig {
            filled: 1.0,
            ..Default::default()
        });
        for id in 1..=1000 {
            fills.add(&Order {
                id,
                time: NaiveDateTime::MAX - TimeDelta::seconds(1),
                amount: 10,
                price: 1.0,
            });
        }
        // Only fills within the last second of the calendar are made.
        let made = fills.rest().len();
        assert!((1..500).contains(&made), "{made}");
    }
}
