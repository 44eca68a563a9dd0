//! The small, safe expression language of a sweep's `derived:` values.
//!
//! Grammar (no assignment, no loops, no I/O; every value is an `f64`):
//! ```text
//! expr    := sum
//! sum     := product (('+' | '-') product)*
//! product := unary (('*' | '/' | '//' | '%') unary)*
//! unary   := '-' unary | power
//! power   := atom ('^' unary)?            // right-associative, binds tighter than unary minus on its left
//! atom    := number | name | name '(' expr (',' expr)* ')' | '(' expr ')'
//! ```
//! Numbers are decimal (`20`, `1.5e-3`, `1_000_000`); names are dotted config keys
//! (`train.batch_size`) or the built-in quantities the caller provides (`params`,
//! `flops_per_token`, …). Functions: `min`, `max` (any number of arguments), `round`, `floor`,
//! `ceil`, `abs`, `log` (natural), `log2`, `log10`, `exp`, `sqrt`, `pow(x, y)`.
//! `a // b` is floor division, `a % b` the remainder of floor division (Python's semantics).
//! The result must be finite; division by zero and `log` of a non-positive number are errors.

/// A parsed expression.
#[derive(Clone, Debug, PartialEq)]
pub enum Expr {
    Num(f64),
    Name(String),
    Neg(Box<Expr>),
    Bin(char, Box<Expr>, Box<Expr>),
    Call(String, Vec<Expr>),
}

const FUNCTIONS: &[&str] = &["min", "max", "round", "floor", "ceil", "abs", "log", "log2", "log10", "exp", "sqrt", "pow"];

#[derive(Clone, Debug, PartialEq)]
enum Tok {
    Num(f64),
    Name(String),
    Op(char),
    FloorDiv,
    LParen,
    RParen,
    Comma,
}

fn tokenize(src: &str) -> Result<Vec<Tok>, String> {
    let b = src.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let c = b[i] as char;
        if c.is_ascii_whitespace() {
            i += 1;
        } else if c.is_ascii_digit() || (c == '.' && b.get(i + 1).is_some_and(|d| d.is_ascii_digit())) {
            let start = i;
            while i < b.len() && (b[i].is_ascii_digit() || b[i] == b'.' || b[i] == b'_') {
                i += 1;
            }
            if i < b.len() && (b[i] == b'e' || b[i] == b'E') {
                let mut j = i + 1;
                if j < b.len() && (b[j] == b'+' || b[j] == b'-') {
                    j += 1;
                }
                if j < b.len() && b[j].is_ascii_digit() {
                    i = j;
                    while i < b.len() && b[i].is_ascii_digit() {
                        i += 1;
                    }
                }
            }
            let text: String = src[start..i].chars().filter(|&c| c != '_').collect();
            let v: f64 = text.parse().map_err(|_| format!("bad number `{}`", &src[start..i]))?;
            out.push(Tok::Num(v));
        } else if c.is_ascii_alphabetic() || c == '_' {
            let start = i;
            while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_' || b[i] == b'.') {
                i += 1;
            }
            out.push(Tok::Name(src[start..i].trim_end_matches('.').to_string()));
        } else {
            i += 1;
            out.push(match c {
                '/' if b.get(i) == Some(&b'/') => {
                    i += 1;
                    Tok::FloorDiv
                }
                '*' if b.get(i) == Some(&b'*') => {
                    i += 1;
                    Tok::Op('^')
                }
                '+' | '-' | '*' | '/' | '^' | '%' => Tok::Op(c),
                '(' => Tok::LParen,
                ')' => Tok::RParen,
                ',' => Tok::Comma,
                _ => return Err(format!("unexpected character `{c}`")),
            });
        }
    }
    Ok(out)
}

struct Parser {
    toks: Vec<Tok>,
    pos: usize,
}

impl Parser {
    fn peek(&self) -> Option<&Tok> {
        self.toks.get(self.pos)
    }
    fn next(&mut self) -> Option<Tok> {
        let t = self.toks.get(self.pos).cloned();
        self.pos += 1;
        t
    }
    fn sum(&mut self) -> Result<Expr, String> {
        let mut lhs = self.product()?;
        while let Some(Tok::Op(op @ ('+' | '-'))) = self.peek().cloned() {
            self.pos += 1;
            lhs = Expr::Bin(op, Box::new(lhs), Box::new(self.product()?));
        }
        Ok(lhs)
    }
    fn product(&mut self) -> Result<Expr, String> {
        let mut lhs = self.unary()?;
        loop {
            let op = match self.peek() {
                Some(Tok::Op(op @ ('*' | '/' | '%'))) => *op,
                Some(Tok::FloorDiv) => 'f',
                _ => return Ok(lhs),
            };
            self.pos += 1;
            lhs = Expr::Bin(op, Box::new(lhs), Box::new(self.unary()?));
        }
    }
    fn unary(&mut self) -> Result<Expr, String> {
        if let Some(Tok::Op('-')) = self.peek() {
            self.pos += 1;
            return Ok(Expr::Neg(Box::new(self.unary()?)));
        }
        if let Some(Tok::Op('+')) = self.peek() {
            self.pos += 1;
            return self.unary();
        }
        let base = self.atom()?;
        if let Some(Tok::Op('^')) = self.peek() {
            self.pos += 1;
            return Ok(Expr::Bin('^', Box::new(base), Box::new(self.unary()?)));
        }
        Ok(base)
    }
    fn atom(&mut self) -> Result<Expr, String> {
        match self.next() {
            Some(Tok::Num(v)) => Ok(Expr::Num(v)),
            Some(Tok::LParen) => {
                let e = self.sum()?;
                match self.next() {
                    Some(Tok::RParen) => Ok(e),
                    _ => Err("missing `)`".into()),
                }
            }
            Some(Tok::Name(n)) => {
                if self.peek() != Some(&Tok::LParen) {
                    return Ok(Expr::Name(n));
                }
                if !FUNCTIONS.contains(&n.as_str()) {
                    return Err(format!("unknown function `{n}`; known: {}", FUNCTIONS.join(", ")));
                }
                self.pos += 1;
                let mut args = vec![self.sum()?];
                loop {
                    match self.next() {
                        Some(Tok::Comma) => args.push(self.sum()?),
                        Some(Tok::RParen) => break,
                        _ => return Err(format!("missing `)` after the arguments of `{n}`")),
                    }
                }
                let want = match n.as_str() {
                    "min" | "max" => None,
                    "pow" => Some(2),
                    _ => Some(1),
                };
                match want {
                    Some(k) if args.len() != k => Err(format!("`{n}` takes {k} argument(s), got {}", args.len())),
                    None if args.is_empty() => Err(format!("`{n}` needs at least one argument")),
                    _ => Ok(Expr::Call(n, args)),
                }
            }
            Some(t) => Err(format!("unexpected {}", describe(&t))),
            None => Err("unexpected end of expression".into()),
        }
    }
}

fn describe(t: &Tok) -> String {
    match t {
        Tok::Num(v) => format!("number {v}"),
        Tok::Name(n) => format!("name `{n}`"),
        Tok::Op('f') | Tok::FloorDiv => "`//`".into(),
        Tok::Op(c) => format!("`{c}`"),
        Tok::LParen => "`(`".into(),
        Tok::RParen => "`)`".into(),
        Tok::Comma => "`,`".into(),
    }
}

/// Parses `src`.
pub fn parse(src: &str) -> Result<Expr, String> {
    let mut p = Parser { toks: tokenize(src)?, pos: 0 };
    let e = p.sum()?;
    match p.peek() {
        None => Ok(e),
        Some(t) => Err(format!("unexpected {} at token {}", describe(t), p.pos + 1)),
    }
}

impl Expr {
    /// Names the expression refers to (for ordering and plan tables).
    pub fn names(&self, out: &mut Vec<String>) {
        match self {
            Expr::Num(_) => {}
            Expr::Name(n) => out.push(n.clone()),
            Expr::Neg(e) => e.names(out),
            Expr::Bin(_, a, b) => {
                a.names(out);
                b.names(out);
            }
            Expr::Call(_, args) => args.iter().for_each(|a| a.names(out)),
        }
    }

    /// Evaluates with `lookup` resolving names.
    pub fn eval(&self, lookup: &mut dyn FnMut(&str) -> Result<f64, String>) -> Result<f64, String> {
        let v = match self {
            Expr::Num(v) => *v,
            Expr::Name(n) => lookup(n)?,
            Expr::Neg(e) => -e.eval(lookup)?,
            Expr::Bin(op, a, b) => {
                let (x, y) = (a.eval(lookup)?, b.eval(lookup)?);
                match op {
                    '+' => x + y,
                    '-' => x - y,
                    '*' => x * y,
                    '/' | 'f' | '%' if y == 0.0 => return Err("division by zero".into()),
                    '/' => x / y,
                    'f' => (x / y).floor(),
                    '%' => x - y * (x / y).floor(),
                    _ => x.powf(y),
                }
            }
            Expr::Call(f, args) => {
                let v: Vec<f64> = args.iter().map(|a| a.eval(lookup)).collect::<Result<_, _>>()?;
                match f.as_str() {
                    "min" => v.iter().copied().fold(f64::INFINITY, f64::min),
                    "max" => v.iter().copied().fold(f64::NEG_INFINITY, f64::max),
                    "round" => v[0].round(),
                    "floor" => v[0].floor(),
                    "ceil" => v[0].ceil(),
                    "abs" => v[0].abs(),
                    "log" | "log2" | "log10" if v[0] <= 0.0 => return Err(format!("{f} of a non-positive number ({})", v[0])),
                    "log" => v[0].ln(),
                    "log2" => v[0].log2(),
                    "log10" => v[0].log10(),
                    "exp" => v[0].exp(),
                    "sqrt" if v[0] < 0.0 => return Err(format!("sqrt of a negative number ({})", v[0])),
                    "sqrt" => v[0].sqrt(),
                    _ => v[0].powf(v[1]),
                }
            }
        };
        if v.is_finite() {
            Ok(v)
        } else {
            Err(format!("the value is not finite ({v})"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(s: &str) -> Result<f64, String> {
        parse(s)?.eval(&mut |n| match n {
            "params" => Ok(1.0e6),
            "train.batch_size" => Ok(16.0),
            "train.seq_len" => Ok(256.0),
            _ => Err(format!("unknown name `{n}`")),
        })
    }

    #[test]
    fn arithmetic_precedence_and_functions() {
        assert_eq!(ev("1 + 2 * 3").unwrap(), 7.0);
        assert_eq!(ev("(1 + 2) * 3").unwrap(), 9.0);
        assert_eq!(ev("2 ^ 3 ^ 2").unwrap(), 512.0);
        assert_eq!(ev("-2 ^ 2").unwrap(), -4.0);
        assert_eq!(ev("2 ** -1").unwrap(), 0.5);
        assert_eq!(ev("7 // 2").unwrap(), 3.0);
        assert_eq!(ev("-7 // 2").unwrap(), -4.0);
        assert_eq!(ev("-7 % 3").unwrap(), 2.0);
        assert_eq!(ev("20 * params").unwrap(), 2.0e7);
        assert_eq!(ev("ceil(20 * params / (train.batch_size * train.seq_len))").unwrap(), (2.0e7f64 / 4096.0).ceil());
        assert_eq!(ev("max(1, 5, 3) + min(2, 0.5)").unwrap(), 5.5);
        assert_eq!(ev("round(2.5) + sqrt(16) + log(exp(1)) + log10(1000) + log2(8) + abs(-1) + pow(2, 10)").unwrap(), 3.0 + 4.0 + 1.0 + 3.0 + 3.0 + 1.0 + 1024.0);
        assert_eq!(ev("1_000 * 1.5e-3").unwrap(), 1.5);
    }

    #[test]
    fn errors_are_explained() {
        assert!(ev("1 / 0").unwrap_err().contains("division by zero"));
        assert!(ev("log(0)").unwrap_err().contains("non-positive"));
        assert!(ev("foo(1)").unwrap_err().contains("unknown function `foo`"));
        assert!(ev("1 +").unwrap_err().contains("end of expression"));
        assert!(ev("(1 + 2").unwrap_err().contains("missing `)`"));
        assert!(ev("nope * 2").unwrap_err().contains("unknown name `nope`"));
        assert!(ev("1 2").unwrap_err().contains("unexpected"));
        assert!(ev("pow(2)").unwrap_err().contains("takes 2"));
        assert!(ev("2 $ 3").unwrap_err().contains("unexpected character"));
        assert!(ev("exp(1000)").unwrap_err().contains("not finite"));
    }
}
