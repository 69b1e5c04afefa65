//! Memory bounds of SQL queries.
//!
//! Rows and wall time do not bound memory: one `repeat('x', 2000000000)`
//! allocates 2 GB in a single call, and one `array_agg` over a long series
//! holds every value. Three bounds close that:
//!
//! - [`QueryPool`]: every operator that buffers (aggregates, sorts, joins,
//!   repartitions) reserves from the query's pool, at most
//!   `sql.max_query_memory_bytes` per query and
//!   `sql.max_total_memory_bytes` for all queries together. Past either the
//!   operator fails with DataFusion's `ResourcesExhausted`.
//! - [`Bounded`]: the functions whose output is not bounded by the size of
//!   their input (`repeat`, `lpad`, `range`, `replace`, …) and those that
//!   add their inputs up (`concat`, `make_array`, …) estimate their output
//!   from their arguments *before* they allocate, and refuse past
//!   `sql.max_expression_bytes` per batch; their output is checked too.
//! - [`ConcatOp`]: the `||` operator is one of the latter, so it is
//!   rewritten into a bounded function with the same meaning and name.
//!
//! Every other function's output is bounded by its inputs times a small
//! factor, so an expression's memory is bounded by the query's text.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use arrow::array::{Array, ArrayRef, AsArray};
use arrow::compute::{cast, kernels::concat_elements::concat_elements_dyn};
use arrow_schema::{DataType, FieldRef, TimeUnit};
use datafusion::common::config::ConfigOptions;
use datafusion::common::tree_node::{Transformed, TreeNode};
use datafusion::common::{DataFusionError, Result, ScalarValue, resources_datafusion_err};
use datafusion::execution::memory_pool::{MemoryLimit, MemoryPool, MemoryReservation};
use datafusion::logical_expr::expr::ScalarFunction;
use datafusion::logical_expr::{
    ColumnarValue, Expr, LogicalPlan, Operator, ReturnFieldArgs, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl,
    Signature, Volatility,
};
use datafusion::optimizer::AnalyzerRule;

/// What all queries together have reserved (`sql.max_total_memory_bytes`).
#[derive(Debug)]
pub(crate) struct SharedBudget {
    limit: usize,
    used: AtomicUsize,
}

impl SharedBudget {
    pub(crate) fn new(limit: usize) -> Arc<SharedBudget> {
        Arc::new(SharedBudget { limit, used: AtomicUsize::new(0) })
    }
}

/// One query's memory pool: its own limit, within the shared budget.
#[derive(Debug)]
pub(crate) struct QueryPool {
    limit: usize,
    used: AtomicUsize,
    shared: Arc<SharedBudget>,
}

impl QueryPool {
    pub(crate) fn new(limit: usize, shared: Arc<SharedBudget>) -> QueryPool {
        QueryPool { limit, used: AtomicUsize::new(0), shared }
    }
}

fn try_add(counter: &AtomicUsize, limit: usize, n: usize) -> Result<(), usize> {
    counter.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |u| u.checked_add(n).filter(|&v| v <= limit)).map(|_| ())
}

impl fmt::Display for QueryPool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "query pool ({} of {} bytes)", self.used.load(Ordering::Relaxed), self.limit)
    }
}

impl MemoryPool for QueryPool {
    fn name(&self) -> &str {
        "sluice-query"
    }

    fn grow(&self, _r: &MemoryReservation, additional: usize) {
        self.used.fetch_add(additional, Ordering::Relaxed);
        self.shared.used.fetch_add(additional, Ordering::Relaxed);
    }

    fn shrink(&self, _r: &MemoryReservation, shrink: usize) {
        self.used.fetch_sub(shrink, Ordering::Relaxed);
        self.shared.used.fetch_sub(shrink, Ordering::Relaxed);
    }

    fn try_grow(&self, r: &MemoryReservation, additional: usize) -> Result<()> {
        try_add(&self.used, self.limit, additional).map_err(|_| {
            resources_datafusion_err!(
                "the query needs more than its {} bytes of memory (sql.max_query_memory_bytes; {} wanted {additional} more)",
                self.limit,
                r.consumer().name()
            )
        })?;
        if try_add(&self.shared.used, self.shared.limit, additional).is_err() {
            self.used.fetch_sub(additional, Ordering::Relaxed);
            return Err(resources_datafusion_err!("{BUSY} ({} bytes, sql.max_total_memory_bytes)", self.shared.limit));
        }
        Ok(())
    }

    fn reserved(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    fn memory_limit(&self) -> MemoryLimit {
        MemoryLimit::Finite(self.limit)
    }
}

impl Drop for QueryPool {
    fn drop(&mut self) {
        // Reservations shrink when they drop; this is only a safety net.
        let left = self.used.swap(0, Ordering::Relaxed);
        self.shared.used.fetch_sub(left, Ordering::Relaxed);
    }
}

/// The start of the message of a query refused because the queries running
/// together hold the shared budget (retrying later can succeed).
pub(crate) const BUSY: &str = "the running queries hold all the memory SQL may use";

/// How a [`Bounded`] function's output is estimated from its arguments.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Estimate {
    /// At most the sum of its arguments (`concat`, `make_array`, …).
    Sum,
    /// `repeat(s, n)`: bytes of `s` times `n`.
    Repeat,
    /// `lpad/rpad(s, n, …)`: `n` characters of up to 4 bytes.
    Pad,
    /// `array_repeat(e, n)`, `array_resize(a, n, …)`: `n` elements.
    Elements,
    /// `range/generate_series(start, stop[, step])`: 8 bytes per element.
    Series,
    /// `replace(s, from, to)`: every `from` becomes a `to`.
    Replace,
    /// `regexp_replace(s, pattern, replacement, …)`: up to one match per
    /// byte, each replaced by the replacement with its references expanded.
    RegexpReplace,
}

fn estimate_of(name: &str) -> Option<Estimate> {
    Some(match name {
        "concat" | "concat_ws" | "array_concat" | "make_array" | "array_append" | "array_prepend" | "overlay"
        | "array_union" => Estimate::Sum,
        "repeat" => Estimate::Repeat,
        "lpad" | "rpad" => Estimate::Pad,
        "array_repeat" | "array_resize" => Estimate::Elements,
        "range" | "generate_series" => Estimate::Series,
        "replace" => Estimate::Replace,
        "regexp_replace" => Estimate::RegexpReplace,
        _ => return None,
    })
}

/// The bytes an argument holds over `rows` rows (a scalar counts once per row).
fn bytes(v: &ColumnarValue, rows: usize) -> u128 {
    match v {
        ColumnarValue::Array(a) => a.to_data().get_slice_memory_size().unwrap_or(usize::MAX) as u128,
        ColumnarValue::Scalar(s) => s.size() as u128 * rows.max(1) as u128,
    }
}

/// An integer argument, row by row (nulls and non-numbers count as 0).
fn ints(v: &ColumnarValue, rows: usize) -> Vec<i128> {
    match v {
        ColumnarValue::Scalar(s) => {
            let n = s.cast_to(&DataType::Int64).ok().and_then(|s| match s {
                ScalarValue::Int64(n) => n,
                _ => None,
            });
            vec![n.unwrap_or(0) as i128; rows.max(1)]
        }
        ColumnarValue::Array(a) => match cast(a, &DataType::Int64) {
            Ok(a) => a.as_primitive::<arrow::datatypes::Int64Type>().iter().map(|n| n.unwrap_or(0) as i128).collect(),
            Err(_) => vec![0; a.len()],
        },
    }
}

/// A time argument as nanoseconds, row by row; an interval as its length
/// (a month counted as 28 days, so the estimate errs high).
fn nanos(v: &ColumnarValue, rows: usize) -> Vec<i128> {
    let interval = |s: &ScalarValue| -> Option<i128> {
        Some(match s {
            ScalarValue::IntervalMonthDayNano(Some(i)) => {
                (i.months as i128 * 28 + i.days as i128) * 86_400_000_000_000 + i.nanoseconds as i128
            }
            ScalarValue::IntervalDayTime(Some(i)) => {
                i.days as i128 * 86_400_000_000_000 + i.milliseconds as i128 * 1_000_000
            }
            ScalarValue::IntervalYearMonth(Some(m)) => *m as i128 * 28 * 86_400_000_000_000,
            _ => return None,
        })
    };
    let ts = DataType::Timestamp(TimeUnit::Nanosecond, None);
    let one = |s: &ScalarValue| -> i128 {
        interval(s)
            .or_else(|| match s.cast_to(&ts) {
                Ok(ScalarValue::TimestampNanosecond(Some(n), _)) => Some(n as i128),
                _ => None,
            })
            .unwrap_or(0)
    };
    match v {
        ColumnarValue::Scalar(s) => vec![one(s); rows.max(1)],
        ColumnarValue::Array(a) => {
            (0..a.len()).map(|i| ScalarValue::try_from_array(a, i).map(|s| one(&s)).unwrap_or(0)).collect()
        }
    }
}

/// String or binary lengths, row by row (other types: their average size).
fn lens(v: &ColumnarValue, rows: usize) -> Vec<u128> {
    let rows = rows.max(1);
    match v {
        ColumnarValue::Scalar(s) => {
            let n = match s {
                ScalarValue::Utf8(Some(t)) | ScalarValue::LargeUtf8(Some(t)) | ScalarValue::Utf8View(Some(t)) => {
                    t.len()
                }
                other => other.size(),
            };
            vec![n as u128; rows]
        }
        ColumnarValue::Array(a) => match a.data_type() {
            DataType::Utf8 => a.as_string::<i32>().iter().map(|s| s.map_or(0, str::len) as u128).collect(),
            DataType::LargeUtf8 => a.as_string::<i64>().iter().map(|s| s.map_or(0, str::len) as u128).collect(),
            DataType::Utf8View => a.as_string_view().iter().map(|s| s.map_or(0, str::len) as u128).collect(),
            _ => vec![bytes(v, rows) / rows as u128; rows],
        },
    }
}

/// A function of DataFusion's, refusing to produce more than `cap` bytes
/// for one batch. Everything but the invocation is the wrapped function's.
#[derive(Debug, PartialEq, Eq, Hash)]
pub(crate) struct Bounded {
    inner: Arc<ScalarUDF>,
    estimate: Estimate,
    cap: usize,
}

impl Bounded {
    /// `f` bounded, if it is one of the functions that need it.
    pub(crate) fn wrap(f: &Arc<ScalarUDF>, cap: usize) -> Option<ScalarUDF> {
        let estimate = estimate_of(f.name())?;
        Some(ScalarUDF::new_from_impl(Bounded { inner: Arc::clone(f), estimate, cap }))
    }

    fn estimate(&self, args: &[ColumnarValue], rows: usize) -> u128 {
        let arg = |i: usize| args.get(i);
        let sum_ints = |v: Option<&ColumnarValue>| ints_or_zero(v, rows).into_iter().map(|n| n.max(0) as u128);
        match self.estimate {
            Estimate::Sum => args.iter().map(|a| bytes(a, rows)).sum(),
            Estimate::Repeat => {
                let l = arg(0).map_or(vec![0; rows.max(1)], |a| lens(a, rows));
                l.iter().zip(sum_ints(arg(1))).map(|(l, n)| l * n).sum()
            }
            Estimate::Pad => sum_ints(arg(1)).map(|n| n * 4).sum(),
            Estimate::Elements => {
                let each = arg(0).map_or(0, |a| bytes(a, rows) / rows.max(1) as u128) + 8;
                sum_ints(arg(1)).map(|n| n * each).sum()
            }
            Estimate::Series => {
                let temporal = arg(0).is_some_and(|a| a.data_type().is_temporal());
                let (start, stop, step) = match temporal {
                    true => (nanos_or_zero(arg(0), rows), nanos_or_zero(arg(1), rows), arg(2).map(|a| nanos(a, rows))),
                    false => (ints_or_zero(arg(0), rows), ints_or_zero(arg(1), rows), arg(2).map(|a| ints(a, rows))),
                };
                // One argument: range(stop) counts from 0.
                let (start, stop) = if args.len() == 1 { (vec![0; stop.len().max(1)], start) } else { (start, stop) };
                let default_step = if temporal { 86_400_000_000_000 } else { 1 };
                let step = step.unwrap_or_else(|| vec![default_step; start.len()]);
                start
                    .iter()
                    .zip(&stop)
                    .zip(&step)
                    .map(|((a, b), s)| ((b - a).unsigned_abs() / s.unsigned_abs().max(1) + 1) * 8)
                    .sum()
            }
            Estimate::Replace => {
                let s = arg(0).map_or(vec![0; rows.max(1)], |a| lens(a, rows));
                let from = arg(1).map_or(vec![1; s.len()], |a| lens(a, rows));
                let to = arg(2).map_or(vec![0; s.len()], |a| lens(a, rows));
                s.iter().zip(&from).zip(&to).map(|((s, f), t)| s + (s / (*f).max(1) + 1) * t).sum()
            }
            Estimate::RegexpReplace => {
                let s = arg(0).map_or(vec![0; rows.max(1)], |a| lens(a, rows));
                let r = arg(2).map_or(vec![0; s.len()], |a| lens(a, rows));
                s.iter().zip(&r).map(|(s, r)| (s + 1) * (2 * r + 1)).sum()
            }
        }
    }
}

fn ints_or_zero(v: Option<&ColumnarValue>, rows: usize) -> Vec<i128> {
    v.map_or(vec![0; rows.max(1)], |v| ints(v, rows))
}

fn nanos_or_zero(v: Option<&ColumnarValue>, rows: usize) -> Vec<i128> {
    v.map_or(vec![0; rows.max(1)], |v| nanos(v, rows))
}

fn too_big(what: &str, bytes: u128, cap: usize) -> DataFusionError {
    resources_datafusion_err!(
        "{what} would produce about {bytes} bytes for one batch, more than the {cap} bytes an expression may \
         (sql.max_expression_bytes)"
    )
}

/// `e` with every function that needs a bound wrapped in [`Bounded`] (and
/// no literal over `cap`).
fn rebound(e: Expr, cap: usize) -> Result<Expr> {
    e.transform_up(|e| match e {
        Expr::ScalarFunction(f) if !(f.func.inner().as_ref() as &dyn std::any::Any).is::<Bounded>() => {
            match Bounded::wrap(&f.func, cap) {
                Some(b) => Ok(Transformed::yes(Expr::ScalarFunction(ScalarFunction::new_udf(Arc::new(b), f.args)))),
                None => Ok(Transformed::no(Expr::ScalarFunction(f))),
            }
        }
        Expr::Literal(v, _) if v.size() > cap => Err(too_big("a folded constant", v.size() as u128, cap)),
        other => Ok(Transformed::no(other)),
    })
    .map(|t| t.data)
}

#[allow(deprecated)] // display_name and is_nullable: delegated like the rest
impl ScalarUDFImpl for Bounded {
    fn name(&self) -> &str {
        self.inner.inner().name()
    }
    fn aliases(&self) -> &[String] {
        self.inner.inner().aliases()
    }
    fn display_name(&self, args: &[Expr]) -> Result<String> {
        self.inner.inner().display_name(args)
    }
    fn schema_name(&self, args: &[Expr]) -> Result<String> {
        self.inner.inner().schema_name(args)
    }
    fn signature(&self) -> &Signature {
        self.inner.inner().signature()
    }
    fn return_type(&self, arg_types: &[DataType]) -> Result<DataType> {
        self.inner.inner().return_type(arg_types)
    }
    fn with_updated_config(&self, config: &ConfigOptions) -> Option<ScalarUDF> {
        let updated = Arc::new(self.inner.inner().with_updated_config(config)?);
        Some(ScalarUDF::new_from_impl(Bounded { inner: updated, estimate: self.estimate, cap: self.cap }))
    }
    fn return_field_from_args(&self, args: ReturnFieldArgs) -> Result<FieldRef> {
        self.inner.inner().return_field_from_args(args)
    }
    fn is_nullable(&self, args: &[Expr], schema: &dyn datafusion::common::ExprSchema) -> bool {
        self.inner.inner().is_nullable(args, schema)
    }
    fn is_strict(&self) -> bool {
        self.inner.inner().is_strict()
    }
    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let estimate = self.estimate(&args.args, args.number_rows);
        if estimate > self.cap as u128 {
            return Err(too_big(self.name(), estimate, self.cap));
        }
        let out = self.inner.inner().invoke_with_args(args)?;
        match bytes(&out, 1) {
            n if n > self.cap as u128 => Err(too_big(self.name(), n, self.cap)),
            _ => Ok(out),
        }
    }
    fn simplify(
        &self,
        args: Vec<Expr>,
        info: &datafusion::logical_expr::simplify::SimplifyContext,
    ) -> Result<datafusion::logical_expr::simplify::ExprSimplifyResult> {
        use datafusion::logical_expr::simplify::ExprSimplifyResult;
        // Simplifying can fold literals without invoking anything (`concat`
        // joins literal arguments) and returns DataFusion's own, unbounded
        // functions: bound the literals and wrap the functions again.
        if self.estimate == Estimate::Sum {
            let literals: u128 = args
                .iter()
                .map(|a| match a {
                    Expr::Literal(v, _) => v.size() as u128,
                    _ => 0,
                })
                .sum();
            if literals > self.cap as u128 {
                return Err(too_big(self.name(), literals, self.cap));
            }
        }
        match self.inner.inner().simplify(args, info)? {
            ExprSimplifyResult::Simplified(e) => Ok(ExprSimplifyResult::Simplified(rebound(e, self.cap)?)),
            original => Ok(original),
        }
    }
    fn short_circuits(&self) -> bool {
        self.inner.inner().short_circuits()
    }
    fn coerce_types(&self, arg_types: &[DataType]) -> Result<Vec<DataType>> {
        self.inner.inner().coerce_types(arg_types)
    }
    fn documentation(&self) -> Option<&datafusion::logical_expr::Documentation> {
        self.inner.inner().documentation()
    }
}

/// SQL's `a || b` on strings and binaries, with the bound of [`Bounded`]:
/// NULL when either side is, same type and same column name as the
/// operator it replaces.
#[derive(Debug, PartialEq, Eq, Hash)]
pub(crate) struct ConcatOp {
    signature: Signature,
    cap: usize,
}

impl ConcatOp {
    pub(crate) fn new(cap: usize) -> ConcatOp {
        ConcatOp { signature: Signature::any(2, Volatility::Immutable), cap }
    }
}

impl ScalarUDFImpl for ConcatOp {
    fn name(&self) -> &str {
        "||"
    }
    fn signature(&self) -> &Signature {
        &self.signature
    }
    fn schema_name(&self, args: &[Expr]) -> Result<String> {
        Ok(format!("{} || {}", args[0].schema_name(), args[1].schema_name()))
    }
    fn return_type(&self, arg_types: &[DataType]) -> Result<DataType> {
        Ok(arg_types[0].clone())
    }
    fn return_field_from_args(&self, args: ReturnFieldArgs) -> Result<FieldRef> {
        // As the operator: nullable when either side is.
        let nullable = args.arg_fields.iter().any(|f| f.is_nullable());
        Ok(Arc::new(arrow_schema::Field::new("||", args.arg_fields[0].data_type().clone(), nullable)))
    }
    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let rows = args.number_rows;
        let estimate: u128 = args.args.iter().map(|a| bytes(a, rows)).sum();
        if estimate > self.cap as u128 {
            return Err(too_big("||", estimate, self.cap));
        }
        let scalar = args.args.iter().all(|a| matches!(a, ColumnarValue::Scalar(_)));
        let target = args.return_type().clone();
        let work = match target {
            DataType::Binary | DataType::LargeBinary | DataType::BinaryView => DataType::LargeBinary,
            _ => DataType::LargeUtf8,
        };
        let arrays: Vec<ArrayRef> =
            ColumnarValue::values_to_arrays(&args.args)?.iter().map(|a| cast(a, &work)).collect::<Result<_, _>>()?;
        let joined = cast(&concat_elements_dyn(&arrays[0], &arrays[1])?, &target)?;
        Ok(match scalar {
            true => ColumnarValue::Scalar(ScalarValue::try_from_array(&joined, 0)?),
            false => ColumnarValue::Array(joined),
        })
    }
}

/// Rewrites `||` into [`ConcatOp`]. It runs after type coercion, so both
/// sides have one string (or binary) type: `||` on arrays is planned as
/// `array_concat` before this.
#[derive(Debug)]
pub(crate) struct BoundConcat {
    op: Arc<ScalarUDF>,
}

impl BoundConcat {
    pub(crate) fn new(cap: usize) -> BoundConcat {
        BoundConcat { op: Arc::new(ScalarUDF::new_from_impl(ConcatOp::new(cap))) }
    }
}

impl AnalyzerRule for BoundConcat {
    fn name(&self) -> &str {
        "sluice_bound_concat"
    }

    fn analyze(&self, plan: LogicalPlan, _config: &ConfigOptions) -> Result<LogicalPlan> {
        plan.transform_up_with_subqueries(|node| {
            node.map_expressions(|e| {
                e.transform_up(|e| match e {
                    Expr::BinaryExpr(b) if b.op == Operator::StringConcat => Ok(Transformed::yes(
                        Expr::ScalarFunction(ScalarFunction::new_udf(Arc::clone(&self.op), vec![*b.left, *b.right])),
                    )),
                    other => Ok(Transformed::no(other)),
                })
            })
        })
        .map(|t| t.data)
    }
}

#[cfg(test)]
mod tests {
    use datafusion::execution::memory_pool::MemoryConsumer;

    use super::*;

    #[test]
    fn a_query_is_held_to_its_own_limit_and_all_queries_to_the_shared_one() {
        let shared = SharedBudget::new(100);
        let a: Arc<dyn MemoryPool> = Arc::new(QueryPool::new(60, Arc::clone(&shared)));
        let b: Arc<dyn MemoryPool> = Arc::new(QueryPool::new(60, Arc::clone(&shared)));
        let ra = MemoryConsumer::new("a").register(&a);
        let rb = MemoryConsumer::new("b").register(&b);
        ra.try_grow(50).unwrap();
        let own = ra.try_grow(11).unwrap_err().to_string();
        assert!(own.contains("sql.max_query_memory_bytes"), "{own}");
        // b fits its own limit, not what a leaves of the shared one.
        let busy = rb.try_grow(60).unwrap_err().to_string();
        assert!(busy.contains(BUSY) && busy.contains("sql.max_total_memory_bytes"), "{busy}");
        assert_eq!(b.reserved(), 0, "a refused grow takes nothing");
        rb.try_grow(50).unwrap();
        drop(ra);
        assert_eq!(shared.used.load(Ordering::Relaxed), 50, "a's memory is back");
        rb.try_grow(10).unwrap();
        drop(rb);
        drop((a, b));
        assert_eq!(shared.used.load(Ordering::Relaxed), 0);
    }
}
