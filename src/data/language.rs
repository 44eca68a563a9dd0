//! A built-in synthetic language whose generator knows the exact probability of every token.
//!
//! # The language
//! Token ids: `BOS`=0, `EOD`=1, `REF`=2, then `OPEN_j` and `CLOSE_j` for `n_bracket_types`
//! bracket types, then `NAME_i` for `n_names` names; every remaining id is a *word*.
//! A sequence starts with `BOS`; documents end with `EOD` and the next one starts right after
//! it (packing), and the sequence is simply cut at the requested length. At each *free*
//! position the generator makes one decision, with fixed probabilities renormalised over the
//! options allowed in the current state:
//! * **word** — a two-stage Zipf draw (Zipf's law). First a word *class*: a mixture (weights
//!   `class_ctx_weights`) of three Zipf laws over seeded permutations of the classes, chosen
//!   by the contexts (c1), (c1, c2) and (c1, c2, topic), where c1/c2 are the classes of the
//!   previous two words of the document and the *topic* is the type of the innermost open
//!   bracket (+1), or 0 at top level. Then a word of that class: a mixture (weight
//!   `word_topic_weight`) of a Zipf law over a topic-independent and a topic-specific seeded
//!   permutation of the class's words. The graded contexts give every model size something
//!   to learn: a bigram model sees c1 only, the rest needs 2-back classes and the bracket
//!   stack. Classes partition the words, so p(word) = p(class)·p(word | class), and both
//!   mixtures are summed out exactly (their components are not hidden state that matters).
//! * **open** `OPEN_j` (uniform type j, only below `max_depth`) / **close** (only inside a
//!   bracket; always the innermost type) — a Dyck language of nested, typed brackets whose
//!   type steers the word statistics inside it (long-range, stack-structured context).
//! * **define** — an unused `NAME_i` (uniform over the names unused in this document) followed
//!   by exactly `def_len` words of the word process.
//! * **reference** (only once some name is defined in this document) — `REF`, a `NAME`
//!   uniform over the defined names, then an exact copy of that name's `def_len` words, each
//!   with probability 1. This is associative recall in the sense of zoology's MQAR (Arora et
//!   al., 2023, "Zoology: Measuring and Improving Recall in Efficient Language Models"): it
//!   rewards models that can look the definition up in context.
//! * **end of document** `EOD` (only at depth 0 after `min_doc_len` tokens); it resets all
//!   state (brackets, word history, names).
//!
//! # Why the entropy floor is exact
//! Every decision is observable from the emitted tokens: the token kinds of the options are
//! disjoint, a word determines its class, a close is forced given the decision, and the state
//! (bracket stack, last two word classes, defined names and their words, position inside a
//! definition or copy) is a deterministic function of the token prefix. Hence the probability
//! the generator reports, p(decision)·p(token | decision), *is* the conditional
//! p(token_t | tokens_<t) of the process. The only unobserved choice, a word draw's mixture
//! component, is summed out in the reported probability and influences nothing later. Because
//! every sequence starts at a fresh document, nothing before the window matters either. The
//! mean reported −ln p over a stream is therefore an unbiased estimate of the cross-entropy
//! of the Bayes-optimal predictor, i.e. the loss floor (it depends on the sequence length,
//! since early positions have less context). [`Language::next_distribution`] recomputes the
//! full conditional from a prefix by replay; the tests check that both agree.
//!
//! The language (class map, permutations, Zipf tables) depends only on `language_seed`;
//! [`Split`], the stream seed and the sequence index only pick the sampling randomness, so
//! train and validation share one language but use disjoint deterministic streams.

pub use super::language_params::LanguageParams;
use super::rng::{mix, Rng};
use super::zipf::Zipf;

/// Which stream: training and validation are disjoint deterministic streams.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Split {
    /// Training stream.
    Train,
    /// Validation stream.
    Val,
}

/// Beginning of sequence (position 0 of every sequence).
pub const BOS: u32 = 0;
/// End of document.
pub const EOD: u32 = 1;
/// Start of a reference (followed by a defined `NAME` and a copy of its words).
pub const REF: u32 = 2;

// Decision indices at a free position.
const WORD: usize = 0;
const OPEN: usize = 1;
const CLOSE: usize = 2;
const DEFINE: usize = 3;
const REFER: usize = 4;
const END: usize = 5;
const N_DEC: usize = 6;

/// What a token id is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Bos,
    Eod,
    Ref,
    Open(usize),
    Close(usize),
    Name(usize),
    Word(usize),
}

/// Where the generator is, beyond free positions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Free,
    /// Inside a definition of `name`, `filled` words emitted so far.
    Define {
        name: usize,
        filled: usize,
    },
    /// Right after `REF`: a defined name comes next.
    AfterRef,
    /// Copying the definition of `name`, `pos` words copied so far.
    Copy {
        name: usize,
        pos: usize,
    },
}

/// Generator state: a deterministic function of the token prefix.
#[derive(Clone, Debug)]
struct State {
    stack: Vec<usize>,
    c1: usize,
    c2: usize,
    is_defined: Vec<bool>,
    defined: Vec<usize>,
    defs: Vec<u32>,
    doc_len: usize,
    mode: Mode,
}

/// A synthetic language with exactly known conditional probabilities (see module docs).
#[derive(Clone, Debug)]
pub struct Language {
    p: LanguageParams,
    n_words: usize,
    n_topics: usize,
    open0: u32,
    close0: u32,
    name0: u32,
    word0: u32,
    /// Class of each word (index `token - word0`).
    class_of: Vec<u16>,
    /// Start of each class's block in the per-topic ranked word lists (len `n_classes + 1`).
    class_off: Vec<usize>,
    class_law: Zipf,
    word_law: Vec<Zipf>,
    /// Normalised weights of the three class-context levels (cumulative for sampling).
    class_w: [f64; 3],
    class_cum: [f64; 3],
    /// `[ctx * C + rank]` -> class; and the inverse `[ctx * C + class]` -> rank, for the
    /// contexts of all three levels (see [`Language::class_ctxs`]).
    class_ranked: Vec<u16>,
    class_rank_of: Vec<u16>,
    /// `[table * W + class_off[c] + rank]` -> word token; inverse `[table * W + w]` -> rank.
    /// Table 0 is topic-independent, table `1 + topic` topic-specific.
    word_ranked: Vec<u32>,
    word_rank_of: Vec<u32>,
    /// Normalised decision probabilities and −ln of them, per allowed-option mask.
    dec_p: Vec<[f64; N_DEC]>,
    dec_nlp: Vec<[f64; N_DEC]>,
}

fn shuffle<T>(v: &mut [T], rng: &mut Rng) {
    for i in (1..v.len()).rev() {
        v.swap(i, rng.below(i as u64 + 1) as usize);
    }
}

impl Language {
    /// Builds the language; errors on invalid parameters (e.g. `vocab_size < 64`).
    pub fn new(p: &LanguageParams) -> Result<Self, String> {
        let (b, n, c) = (p.n_bracket_types, p.n_names, p.n_classes);
        if p.vocab_size < 64 || p.vocab_size > u32::MAX as usize {
            return Err(format!(
                "vocab_size {} must be in 64..=2^32-1",
                p.vocab_size
            ));
        }
        if !(1..=32).contains(&b) || !(1..=64).contains(&c) || n > 1024 || p.def_len == 0 {
            return Err(
                "need 1..=32 bracket types, 1..=64 classes, <=1024 names, def_len>=1".into(),
            );
        }
        let specials = 3 + 2 * b + n;
        let n_words = p.vocab_size.saturating_sub(specials);
        if n_words < 2 * c {
            return Err(format!(
                "vocab_size {} leaves {n_words} words for {c} classes (need 2 per class)",
                p.vocab_size
            ));
        }
        let weights = [p.p_word, p.p_open, p.p_close, p.p_define, p.p_ref, p.p_eod];
        let cw = p.class_ctx_weights;
        let zipfs = [p.class_zipf, p.word_zipf];
        let ok = weights
            .iter()
            .chain(&cw)
            .chain(&zipfs)
            .all(|x| x.is_finite() && *x >= 0.0);
        if !ok || p.p_word <= 0.0 || cw.iter().sum::<f64>() <= 0.0 {
            return Err(
                "weights and Zipf exponents must be finite and >= 0, with p_word > 0 \
                        and some class_ctx_weights > 0"
                    .into(),
            );
        }
        if !(0.0..=1.0).contains(&p.word_topic_weight) {
            return Err("word_topic_weight must be in [0, 1]".into());
        }
        let cw_sum: f64 = cw.iter().sum();
        let class_w = cw.map(|w| w / cw_sum);
        let class_cum = [class_w[0], class_w[0] + class_w[1], 1.0];
        let mut rng = Rng::new(mix(p.language_seed, 0x4c41_4e47_5541_4745));
        let n_topics = b + 1;
        // Classes: a seeded balanced partition of the words.
        let mut perm: Vec<usize> = (0..n_words).collect();
        shuffle(&mut perm, &mut rng);
        let mut class_of = vec![0u16; n_words];
        for (i, &w) in perm.iter().enumerate() {
            class_of[w] = (i % c) as u16;
        }
        let mut members: Vec<Vec<u32>> = vec![Vec::new(); c];
        for w in 0..n_words {
            members[class_of[w] as usize].push(w as u32);
        }
        let mut class_off = vec![0usize; c + 1];
        for k in 0..c {
            class_off[k + 1] = class_off[k] + members[k].len();
        }
        let word0 = specials as u32;
        let mut word_ranked = vec![0u32; (n_topics + 1) * n_words];
        let mut word_rank_of = vec![0u32; (n_topics + 1) * n_words];
        for t in 0..=n_topics {
            for (k, m) in members.iter().enumerate() {
                let mut ranked = m.clone();
                shuffle(&mut ranked, &mut rng);
                for (r, &w) in ranked.iter().enumerate() {
                    word_ranked[t * n_words + class_off[k] + r] = word0 + w;
                    word_rank_of[t * n_words + w as usize] = r as u32;
                }
            }
        }
        let n_ctx = (c + 1) + (c + 1) * (c + 1) * (1 + n_topics);
        let mut class_ranked = vec![0u16; n_ctx * c];
        let mut class_rank_of = vec![0u16; n_ctx * c];
        for ctx in 0..n_ctx {
            let row = &mut class_ranked[ctx * c..(ctx + 1) * c];
            row.iter_mut().enumerate().for_each(|(i, x)| *x = i as u16);
            shuffle(row, &mut rng);
            for r in 0..c {
                class_rank_of[ctx * c + class_ranked[ctx * c + r] as usize] = r as u16;
            }
        }
        let (mut dec_p, mut dec_nlp) = (Vec::new(), Vec::new());
        for mask in 0..(1usize << N_DEC) {
            let total: f64 = (0..N_DEC)
                .filter(|d| mask >> d & 1 == 1)
                .map(|d| weights[d])
                .sum();
            let mut ps = [0.0; N_DEC];
            let mut ns = [f64::INFINITY; N_DEC];
            for d in (0..N_DEC).filter(|d| mask >> d & 1 == 1 && total > 0.0) {
                ps[d] = weights[d] / total;
                ns[d] = -ps[d].ln();
            }
            dec_p.push(ps);
            dec_nlp.push(ns);
        }
        Ok(Language {
            n_words,
            n_topics,
            open0: 3,
            close0: 3 + b as u32,
            name0: 3 + 2 * b as u32,
            word0,
            class_of,
            class_off,
            class_law: Zipf::new(c, p.class_zipf),
            word_law: members
                .iter()
                .map(|m| Zipf::new(m.len(), p.word_zipf))
                .collect(),
            class_w,
            class_cum,
            class_ranked,
            class_rank_of,
            word_ranked,
            word_rank_of,
            dec_p,
            dec_nlp,
            p: p.clone(),
        })
    }

    /// Number of token ids.
    pub fn vocab_size(&self) -> usize {
        self.p.vocab_size
    }

    /// The parameters this language was built from.
    pub fn params(&self) -> &LanguageParams {
        &self.p
    }

    /// Describes the special token ids and the structure (one short string).
    pub fn describe(&self) -> String {
        let p = &self.p;
        let (o, c, n, w, v) = (
            self.open0,
            self.close0,
            self.name0,
            self.word0,
            p.vocab_size,
        );
        format!(
            "synthetic language (seed {}): vocab {v}; BOS=0 EOD=1 REF=2 OPEN={o}..={} \
             CLOSE={c}..={} NAME={n}..={} words={w}..={} ({} words in {} classes, Zipf {}/{}); \
             max depth {}, definitions of {} words",
            p.language_seed,
            c - 1,
            n - 1,
            w - 1,
            v - 1,
            self.n_words,
            p.n_classes,
            p.class_zipf,
            p.word_zipf,
            p.max_depth,
            p.def_len
        )
    }

    /// Sequence number `index` of stream (`split`, `seed`): `len` tokens starting with BOS,
    /// and for each position t the true −ln p(token_t | tokens_<t) under the generator (0.0
    /// for t=0, the BOS). Pure function of (language, split, seed, index, len).
    pub fn sequence(
        &self,
        split: Split,
        seed: u64,
        index: u64,
        len: usize,
    ) -> (Vec<u32>, Vec<f64>) {
        let tag = match split {
            Split::Train => 0x5452_4149_4e00_0001,
            Split::Val => 0x5641_4c00_0000_0002,
        };
        let mut rng = Rng::new(mix(mix(mix(self.p.language_seed, tag), seed), index));
        let (mut toks, mut nlps) = (Vec::with_capacity(len), Vec::with_capacity(len));
        if len == 0 {
            return (toks, nlps);
        }
        toks.push(BOS);
        nlps.push(0.0);
        let mut st = self.fresh_state();
        for _ in 1..len {
            let (t, nlp) = self.sample_next(&st, &mut rng);
            self.advance(&mut st, t);
            toks.push(t);
            nlps.push(nlp);
        }
        (toks, nlps)
    }

    /// Mean −ln p over positions 1.. of sequences `0..n_seqs` of stream (`split`, `seed`):
    /// a Monte-Carlo estimate of the entropy floor (Bayes-optimal loss) for that length.
    pub fn mean_nlp(&self, split: Split, seed: u64, n_seqs: u64, len: usize) -> f64 {
        let (mut sum, mut count) = (0.0, 0usize);
        for i in 0..n_seqs {
            let (_, nlp) = self.sequence(split, seed, i, len);
            sum += nlp.iter().skip(1).sum::<f64>();
            count += nlp.len().saturating_sub(1);
        }
        sum / count.max(1) as f64
    }

    /// The generator's full next-token distribution after `prefix`, reconstructed by
    /// replaying the prefix (every generating decision is observable from the tokens).
    ///
    /// # Panics
    /// If `prefix` does not start with `BOS` or contains a token of probability 0.
    pub fn next_distribution(&self, prefix: &[u32]) -> Vec<f64> {
        assert_eq!(prefix.first(), Some(&BOS), "prefix must start with BOS");
        let mut st = self.fresh_state();
        for (i, &t) in prefix.iter().enumerate().skip(1) {
            assert!(
                self.prob(&st, t) > 0.0,
                "token {t} at position {i} is impossible"
            );
            self.advance(&mut st, t);
        }
        (0..self.p.vocab_size as u32)
            .map(|t| self.prob(&st, t))
            .collect()
    }

    fn fresh_state(&self) -> State {
        State {
            stack: Vec::with_capacity(self.p.max_depth),
            c1: self.p.n_classes,
            c2: self.p.n_classes,
            is_defined: vec![false; self.p.n_names],
            defined: Vec::with_capacity(self.p.n_names),
            defs: vec![0; self.p.n_names * self.p.def_len],
            doc_len: 0,
            mode: Mode::Free,
        }
    }

    fn kind(&self, t: u32) -> Kind {
        match t {
            BOS => Kind::Bos,
            EOD => Kind::Eod,
            REF => Kind::Ref,
            _ if t < self.close0 => Kind::Open((t - self.open0) as usize),
            _ if t < self.name0 => Kind::Close((t - self.close0) as usize),
            _ if t < self.word0 => Kind::Name((t - self.name0) as usize),
            _ => Kind::Word((t - self.word0) as usize),
        }
    }

    /// Bit mask of the decisions allowed at a free position.
    fn mask(&self, st: &State) -> usize {
        let depth = st.stack.len();
        let mut m = 1 << WORD;
        m |= ((depth < self.p.max_depth) as usize) << OPEN;
        m |= ((depth > 0) as usize) << CLOSE;
        m |= ((st.defined.len() < self.p.n_names) as usize) << DEFINE;
        m |= (!st.defined.is_empty() as usize) << REFER;
        m |= ((depth == 0 && st.doc_len >= self.p.min_doc_len) as usize) << END;
        m
    }

    #[inline]
    fn topic(st: &State) -> usize {
        st.stack.last().map_or(0, |&j| j + 1)
    }

    /// Row indices of the class-ranking tables for the three context levels:
    /// (c1), (c1, c2), (c1, c2, topic), where c1/c2 are the classes of the last two words.
    #[inline]
    fn class_ctxs(&self, st: &State) -> [usize; 3] {
        let c1 = self.p.n_classes + 1;
        let pair = st.c1 * c1 + st.c2;
        [
            st.c1,
            c1 + pair,
            c1 + c1 * c1 + pair * self.n_topics + Self::topic(st),
        ]
    }

    /// Samples a word token: a mixture component, a Zipf rank, a class; then likewise a word.
    fn sample_word(&self, st: &State, rng: &mut Rng) -> (u32, f64) {
        let c = self.p.n_classes;
        let u = rng.next_f64();
        let level = self.class_cum.iter().position(|&x| u < x).unwrap_or(2);
        let r = self.class_law.sample(rng);
        let k = self.class_ranked[self.class_ctxs(st)[level] * c + r] as usize;
        let table = if rng.next_f64() < self.p.word_topic_weight {
            1 + Self::topic(st)
        } else {
            0
        };
        let r2 = self.word_law[k].sample(rng);
        let tok = self.word_ranked[table * self.n_words + self.class_off[k] + r2];
        (tok, -self.word_prob(st, (tok - self.word0) as usize).ln())
    }

    /// Exact probability of word `w` given the state: both mixtures marginalised.
    fn word_prob(&self, st: &State, w: usize) -> f64 {
        let (c, nw) = (self.p.n_classes, self.n_words);
        let k = self.class_of[w] as usize;
        let ctxs = self.class_ctxs(st);
        let pc: f64 = (0..3)
            .map(|l| {
                self.class_w[l] * self.class_law.pmf[self.class_rank_of[ctxs[l] * c + k] as usize]
            })
            .sum();
        let (law, tw) = (&self.word_law[k], self.p.word_topic_weight);
        let pw = (1.0 - tw) * law.pmf[self.word_rank_of[w] as usize]
            + tw * law.pmf[self.word_rank_of[(1 + Self::topic(st)) * nw + w] as usize];
        pc * pw
    }

    /// Samples the next token and its exact −ln p given the state.
    fn sample_next(&self, st: &State, rng: &mut Rng) -> (u32, f64) {
        match st.mode {
            Mode::Define { .. } => self.sample_word(st, rng),
            Mode::AfterRef => {
                let k = rng.below(st.defined.len() as u64) as usize;
                (
                    self.name0 + st.defined[k] as u32,
                    (st.defined.len() as f64).ln(),
                )
            }
            Mode::Copy { name, pos } => (st.defs[name * self.p.def_len + pos], 0.0),
            Mode::Free => {
                let m = self.mask(st);
                let probs = &self.dec_p[m];
                let u = rng.next_f64();
                let (mut acc, mut d) = (0.0, WORD);
                for (i, &p) in probs.iter().enumerate() {
                    if p > 0.0 {
                        d = i;
                        acc += p;
                        if u < acc {
                            break;
                        }
                    }
                }
                let dn = self.dec_nlp[m][d];
                match d {
                    WORD => {
                        let (t, n) = self.sample_word(st, rng);
                        (t, dn + n)
                    }
                    OPEN => {
                        let b = self.p.n_bracket_types as u64;
                        (self.open0 + rng.below(b) as u32, dn + (b as f64).ln())
                    }
                    CLOSE => (self.close0 + *st.stack.last().unwrap() as u32, dn),
                    DEFINE => {
                        let free = self.p.n_names - st.defined.len();
                        let k = rng.below(free as u64) as usize;
                        let name = (0..self.p.n_names)
                            .filter(|&i| !st.is_defined[i])
                            .nth(k)
                            .unwrap();
                        (self.name0 + name as u32, dn + (free as f64).ln())
                    }
                    REFER => (REF, dn),
                    _ => (EOD, dn),
                }
            }
        }
    }

    /// Exact probability of token `t` given the state.
    fn prob(&self, st: &State, t: u32) -> f64 {
        let kind = self.kind(t);
        match st.mode {
            Mode::Define { .. } => match kind {
                Kind::Word(w) => self.word_prob(st, w),
                _ => 0.0,
            },
            Mode::AfterRef => match kind {
                Kind::Name(i) if st.is_defined[i] => 1.0 / st.defined.len() as f64,
                _ => 0.0,
            },
            Mode::Copy { name, pos } => (t == st.defs[name * self.p.def_len + pos]) as u8 as f64,
            Mode::Free => {
                let p = &self.dec_p[self.mask(st)];
                match kind {
                    Kind::Bos => 0.0,
                    Kind::Eod => p[END],
                    Kind::Ref => p[REFER],
                    Kind::Open(_) => p[OPEN] / self.p.n_bracket_types as f64,
                    Kind::Close(j) if st.stack.last() == Some(&j) => p[CLOSE],
                    Kind::Close(_) => 0.0,
                    Kind::Name(i) if !st.is_defined[i] => {
                        p[DEFINE] / (self.p.n_names - st.defined.len()) as f64
                    }
                    Kind::Name(_) => 0.0,
                    Kind::Word(w) => p[WORD] * self.word_prob(st, w),
                }
            }
        }
    }

    /// Updates the state with token `t` (assumed possible).
    fn advance(&self, st: &mut State, t: u32) {
        st.doc_len += 1;
        let kind = self.kind(t);
        let l = self.p.def_len;
        if let Kind::Word(w) = kind {
            st.c2 = st.c1;
            st.c1 = self.class_of[w] as usize;
        }
        st.mode = match (st.mode, kind) {
            (Mode::Define { name, filled }, _) => {
                st.defs[name * l + filled] = t;
                if filled + 1 == l {
                    Mode::Free
                } else {
                    Mode::Define {
                        name,
                        filled: filled + 1,
                    }
                }
            }
            (Mode::AfterRef, Kind::Name(name)) => Mode::Copy { name, pos: 0 },
            (Mode::Copy { name, pos }, _) => {
                if pos + 1 == l {
                    Mode::Free
                } else {
                    Mode::Copy { name, pos: pos + 1 }
                }
            }
            (Mode::Free, Kind::Eod) => {
                st.stack.clear();
                st.c1 = self.p.n_classes;
                st.c2 = self.p.n_classes;
                st.is_defined.fill(false);
                st.defined.clear();
                st.doc_len = 0;
                Mode::Free
            }
            (Mode::Free, Kind::Ref) => Mode::AfterRef,
            (Mode::Free, Kind::Open(j)) => {
                st.stack.push(j);
                Mode::Free
            }
            (Mode::Free, Kind::Close(_)) => {
                st.stack.pop();
                Mode::Free
            }
            (Mode::Free, Kind::Name(name)) => {
                st.is_defined[name] = true;
                st.defined.push(name);
                Mode::Define { name, filled: 0 }
            }
            (mode, _) => mode,
        };
    }
}

#[cfg(test)]
#[path = "language_tests.rs"]
mod tests;
