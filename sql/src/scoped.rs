//! One tenant's view of a table, sealed so that nothing the caller writes
//! runs on another tenant's rows.
//!
//! A plain view (`SELECT * FROM lake WHERE tenant = 'acme'`) is inlined into
//! the caller's query: the optimizer merges the tenant filter with the
//! caller's `WHERE` into one predicate and pushes it into the scan, so the
//! caller's expression is evaluated on every tenant's rows. An expression
//! that fails on one chosen row (`CASE WHEN job_id = 'x' THEN CAST(job_id AS
//! BIGINT) ELSE 0 END = 0`) then answers "does another tenant's job `x`
//! exist", one bit per query.
//!
//! [`TenantTable`] closes that: it plans its own scan (the view plus the
//! tenant filter, optimised and pushed into the Parquet scan or the shard's
//! SQL) and hands the caller a [`TenantScanExec`], a leaf the optimizer
//! cannot look into or push filters through. Caller filters are evaluated
//! above it, on the tenant's rows only. The only caller filters taken into
//! the scan are comparisons of a bare column with a literal, which cannot
//! fail on any row. The leaf displays neither the files nor the plan under
//! it, and reports no metrics, so `EXPLAIN ANALYZE` shows no lake paths and
//! no other tenant's row counts.

use std::fmt;
use std::sync::Arc;

use arrow_schema::SchemaRef;
use datafusion::catalog::{Session, TableProvider};
use datafusion::common::tree_node::TreeNodeRecursion;
use datafusion::datasource::TableType;
use datafusion::error::Result;
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::logical_expr::{
    Expr, LogicalPlan, LogicalPlanBuilder, Operator, TableProviderFilterPushDown, col, lit,
};
use datafusion::physical_plan::{DisplayAs, DisplayFormatType, ExecutionPlan, PhysicalExpr, PlanProperties};

/// `plan` (a view) restricted to `tenant`'s rows; see the module docs.
#[derive(Debug)]
pub(crate) struct TenantTable {
    plan: LogicalPlan,
    schema: SchemaRef,
    tenant: String,
}

impl TenantTable {
    pub(crate) fn new(view: &LogicalPlan, tenant: &str) -> Result<TenantTable> {
        let plan = LogicalPlanBuilder::from(view.clone()).filter(col("tenant").eq(lit(tenant)))?.build()?;
        let schema = Arc::new(plan.schema().as_arrow().clone());
        Ok(TenantTable { plan, schema, tenant: tenant.to_owned() })
    }
}

/// A filter that cannot fail on any row, whatever its values: a bare column
/// compared with a literal, `IS [NOT] NULL`, `IN (literals)`, and `AND`/`OR`
/// of those. Only these may run beside the tenant filter.
fn cannot_fail(e: &Expr) -> bool {
    use datafusion::logical_expr::expr::{BinaryExpr, InList};
    let bare = |e: &Expr| matches!(e, Expr::Column(_));
    let literal = |e: &Expr| matches!(e, Expr::Literal(..));
    match e {
        Expr::BinaryExpr(BinaryExpr { left, op, right }) => match op {
            Operator::And | Operator::Or => cannot_fail(left) && cannot_fail(right),
            Operator::Eq | Operator::NotEq | Operator::Lt | Operator::LtEq | Operator::Gt | Operator::GtEq => {
                (bare(left) && literal(right)) || (literal(left) && bare(right))
            }
            _ => false,
        },
        Expr::IsNull(inner) | Expr::IsNotNull(inner) => bare(inner),
        Expr::InList(InList { expr, list, .. }) => bare(expr) && list.iter().all(literal),
        _ => false,
    }
}

#[async_trait::async_trait]
impl TableProvider for TenantTable {
    fn schema(&self) -> SchemaRef {
        Arc::clone(&self.schema)
    }

    fn table_type(&self) -> TableType {
        // Not `View`: nothing may inline it into the caller's plan.
        TableType::Base
    }

    fn supports_filters_pushdown(&self, filters: &[&Expr]) -> Result<Vec<TableProviderFilterPushDown>> {
        // Inexact: DataFusion still applies them above the scan.
        Ok(filters
            .iter()
            .map(|f| match cannot_fail(f) {
                true => TableProviderFilterPushDown::Inexact,
                false => TableProviderFilterPushDown::Unsupported,
            })
            .collect())
    }

    async fn scan(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
        filters: &[Expr],
        limit: Option<usize>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        // The tenant filter sits below the caller's: the optimizer may merge
        // them, which is safe only because these filters cannot fail.
        let mut plan = LogicalPlanBuilder::from(self.plan.clone());
        for f in filters.iter().filter(|f| cannot_fail(f)) {
            plan = plan.filter(f.clone())?;
        }
        if let Some(p) = projection {
            plan = plan.project(p.iter().map(|&i| col(self.schema.field(i).name())))?;
        }
        if limit.is_some() && filters.is_empty() {
            plan = plan.limit(0, limit)?;
        }
        let inner = state.create_physical_plan(&plan.build()?).await?;
        Ok(Arc::new(TenantScanExec { inner, tenant: self.tenant.clone() }))
    }
}

/// The scan of a [`TenantTable`]: a leaf that runs its own plan. The
/// physical optimizer sees no children, so it can neither push a caller's
/// filter below the tenant filter nor show what is under it.
#[derive(Debug)]
pub(crate) struct TenantScanExec {
    inner: Arc<dyn ExecutionPlan>,
    tenant: String,
}

impl DisplayAs for TenantScanExec {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "TenantScan: tenant={}", self.tenant)
    }
}

impl ExecutionPlan for TenantScanExec {
    fn name(&self) -> &str {
        "TenantScanExec"
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        self.inner.properties()
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        vec![]
    }

    fn apply_expressions(
        &self,
        _f: &mut dyn FnMut(&Arc<dyn PhysicalExpr>) -> Result<TreeNodeRecursion>,
    ) -> Result<TreeNodeRecursion> {
        Ok(TreeNodeRecursion::Continue)
    }

    fn with_new_children(self: Arc<Self>, children: Vec<Arc<dyn ExecutionPlan>>) -> Result<Arc<dyn ExecutionPlan>> {
        match children.is_empty() {
            true => Ok(self),
            false => datafusion::common::internal_err!("TenantScanExec has no children"),
        }
    }

    fn execute(&self, partition: usize, context: Arc<TaskContext>) -> Result<SendableRecordBatchStream> {
        self.inner.execute(partition, context)
    }
}
