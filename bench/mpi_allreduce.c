/* One rank of MPI_Allreduce (the Open MPI peer in the all-reduce benchmark).
 * usage: mpirun -np N mpi_allreduce ELEMENTS REPEAT; rank 0 prints "seconds_per_op=S". */
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  int rank;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  const long n = argc > 1 ? atol(argv[1]) : 1 << 20;
  const int repeat = argc > 2 ? atoi(argv[2]) : 10;
  float* buf = malloc(sizeof(float) * n);
  for (long i = 0; i < n; ++i) buf[i] = 1.0f;
  MPI_Allreduce(MPI_IN_PLACE, buf, (int)n, MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD);
  MPI_Barrier(MPI_COMM_WORLD);
  const double t0 = MPI_Wtime();
  for (int i = 0; i < repeat; ++i) {
    MPI_Allreduce(MPI_IN_PLACE, buf, (int)n, MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD);
  }
  const double s = (MPI_Wtime() - t0) / repeat;
  if (rank == 0) printf("seconds_per_op=%.6f\n", s);
  free(buf);
  MPI_Finalize();
  return 0;
}
